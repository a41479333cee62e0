"""VQA annotation files (the reference's JSON format) as datasets, and their batches.

Files are JSON lists (docs/METHOD.md §11):
- VQA entry: `{"dataset": "vqa", "image": "train2014/x.jpg", "question": str,
  "question_id": int, "answer": [str, ...]}` (the 10 human answers; absent in test files);
- VG entry:  `{"dataset": "vg", "image": "image/1.jpg", "question": str, "answer": str}`;
- answer list: `[str, ...]`, the candidates the model ranks at test time.
Image paths are relative to `vqa_root` or `vg_root` by the entry's `dataset`
(or name members of `vqa_shards` / `vg_shards`: `pipeline/image_store.py`).

Training targets (the reference's): a VQA question's distinct answers, each
weighted by its share of the human answers (weights sum to 1); a VG question's
one answer with weight `vg_weight` (0.5 in the reference). Answers are
decoded as `[CLS] answer [SEP]` and never truncated; questions are cleaned by
`pre_question` and truncated at the training token limit, test questions not.

Bad records stop the run with one line naming the file, the entry and its
question id: a malformed entry, an unknown `dataset`, a missing image, an
empty question, no answers, a repeated test question id, an empty or repeated
answer list.
"""
from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from pipeline.annotations import load_or_next, read_annotation_file
from pipeline.image_store import ImageStore, as_store
from pipeline.tokenize import text_batch
from pipeline.transforms import ImageTransform

TRAIN_QUESTION_WORDS = 30   # the reference's pre_question limits
TEST_QUESTION_WORDS = 50

_REMOVED = re.compile(r"([,.'!?\"()*#:;~])")


def pre_question(question: str, max_words: int) -> str:
    """The reference's question cleaning: lowercase, drop ,.'!?"()*#:;~, '-' and '/' -> space,
    strip trailing spaces, keep `max_words` words. Unlike `pre_caption`, repeated spaces stay."""
    question = _REMOVED.sub("", question.lower()).replace("-", " ").replace("/", " ").rstrip(" ")
    words = question.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else question


def read_answer_list(path: str | Path) -> list[str]:
    """The candidate answers: a non-empty JSON list of distinct non-empty strings."""
    answers = read_annotation_file(path)
    if not answers:
        raise ValueError(f"answer list {path} is empty: ranking needs at least one candidate")
    seen: dict[str, int] = {}
    for n, answer in enumerate(answers):
        if not isinstance(answer, str) or not answer.strip():
            raise ValueError(f"answer list {path} entry {n}: {answer!r} is not a non-empty string")
        if answer in seen:
            raise ValueError(f"answer list {path}: {answer!r} appears twice (entries {seen[answer]} and {n})")
        seen[answer] = n
    return answers


def _where(file, n: int, ann) -> str:
    qid = ann.get("question_id") if isinstance(ann, dict) else None
    return f"{file} entry {n}" + (f" (question_id {qid})" if qid is not None else "")


def _image_path(file, n, ann, stores: dict[str, ImageStore | None]) -> tuple[str, str]:
    """(the entry's `dataset`, its image as that dataset's store names it)."""
    dataset = ann.get("dataset")
    if dataset not in stores:
        raise ValueError(f"{_where(file, n, ann)}: dataset {dataset!r} is unknown; known: {', '.join(stores)}")
    if stores[dataset] is None:
        raise ValueError(f"{_where(file, n, ann)}: a {dataset!r} entry, but neither data.{dataset}_root "
                         f"nor data.{dataset}_shards is set")
    if not isinstance(ann.get("image"), str):
        raise ValueError(f"{_where(file, n, ann)}: no image path (string 'image')")
    store = stores[dataset]
    path = store.locate(ann["image"])
    if not store.exists(path):
        raise FileNotFoundError(f"{_where(file, n, ann)}: image {path} not found in the {store!r}")
    return dataset, path


def _stores(roots: dict[str, ImageStore | str | None]) -> dict[str, ImageStore | None]:
    return {name: None if root is None else as_store(root) for name, root in roots.items()}


def _question(file, n, ann, max_words: int) -> str:
    raw = ann.get("question")
    question = pre_question(raw, max_words) if isinstance(raw, str) else ""
    if not question.strip():
        raise ValueError(f"{_where(file, n, ann)}: empty question {raw!r}")
    return question


def answer_weights(answers: Sequence[str]) -> tuple[list[str], list[float]]:
    """Distinct answers (first-seen order) and their shares of the human answers."""
    counts = Counter(answers)
    distinct = list(counts)
    return distinct, [counts[a] / len(answers) for a in distinct]


class VQATrainDataset(Dataset):
    """(image, question, distinct answers, weights) per question of the train files.

    Augmentation draws from a `random.Random` seeded by (seed, epoch, index), so a
    sample is augmented the same way whichever worker or rank loads it.
    """

    def __init__(self, ann_files: Sequence[str | Path], roots: dict[str, ImageStore | str | None],
                 transform: ImageTransform, vg_weight: float, max_words: int = TRAIN_QUESTION_WORDS,
                 max_load_retries: int = 10, seed: int = 0):
        self.transform, self.seed, self.epoch = transform, seed, 0
        self.max_load_retries = max_load_retries
        self.stores = _stores(roots)
        # (dataset, image, question, answers, weights)
        self.entries: list[tuple[str, str, str, list[str], list[float]]] = []
        for file in ann_files:
            for n, ann in enumerate(read_annotation_file(file)):
                if not isinstance(ann, dict):
                    raise ValueError(f"{file} entry {n}: not a JSON object")
                source, path = _image_path(file, n, ann, self.stores)
                question = _question(file, n, ann, max_words)
                raw = ann.get("answer")
                if ann["dataset"] == "vg":
                    if not isinstance(raw, str) or not raw.strip():
                        raise ValueError(f"{_where(file, n, ann)}: a VG entry needs one non-empty string 'answer'")
                    answers, weights = [raw], [vg_weight]
                else:
                    if (not isinstance(raw, list) or not raw
                            or not all(isinstance(a, str) and a.strip() for a in raw)):
                        raise ValueError(f"{_where(file, n, ann)}: 'answer' must be a non-empty list of "
                                         f"non-empty strings, got {raw!r}")
                    answers, weights = answer_weights(raw)
                self.entries.append((source, path, question, answers, weights))
        if not self.entries:
            raise ValueError(f"no questions in {', '.join(map(str, ann_files))}")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.entries)

    def _image(self, i: int) -> torch.Tensor:
        source, path = self.entries[i][:2]
        return self.transform(self.stores[source].load(path), random.Random(f"{self.seed}/{self.epoch}/{i}"))

    def __getitem__(self, index: int) -> dict:
        i, image, failures = load_or_next(len(self.entries), index, self._image,
                                          lambda i: {"entry": i, "image": self.entries[i][1]}, self.max_load_retries)
        _, _, question, answers, weights = self.entries[i]
        return {"image": image, "question": question, "answers": answers, "weights": weights,
                "index": i, "load_failures": failures}


class VQAEvalDataset(Dataset):
    """One item per question of a val/test file: (image, question, question_id).

    `answers[i]` holds the human answers where the file has them (None otherwise);
    `has_answers` says whether every question has them (accuracy can be computed).
    An image that cannot be read stops the evaluation (every question must be answered).
    """

    def __init__(self, ann_file: str | Path, roots: dict[str, ImageStore | str | None], transform: ImageTransform,
                 max_words: int = TEST_QUESTION_WORDS):
        self.ann_file, self.transform = str(ann_file), transform
        self.stores = _stores(roots)
        self.sources: list[str] = []     # each question's `dataset`, which names its image store
        self.images: list[str] = []
        self.questions: list[str] = []
        self.question_ids: list[int] = []
        self.answers: list[list[str] | None] = []
        first: dict[int, int] = {}
        for n, ann in enumerate(read_annotation_file(ann_file)):
            if not isinstance(ann, dict):
                raise ValueError(f"{ann_file} entry {n}: not a JSON object")
            qid = ann.get("question_id")
            if not isinstance(qid, int) or isinstance(qid, bool):
                raise ValueError(f"{ann_file} entry {n}: 'question_id' must be an integer, got {qid!r}")
            if qid in first:
                raise ValueError(f"{ann_file} entry {n}: question_id {qid} repeats entry {first[qid]}")
            first[qid] = n
            source, path = _image_path(ann_file, n, ann, self.stores)
            self.sources.append(source)
            self.images.append(path)
            self.questions.append(_question(ann_file, n, ann, max_words))
            self.question_ids.append(qid)
            raw = ann.get("answer")
            if raw is not None and (not isinstance(raw, list) or not raw
                                    or not all(isinstance(a, str) for a in raw)):
                raise ValueError(f"{_where(ann_file, n, ann)}: 'answer' must be a non-empty list of strings")
            self.answers.append(raw)
        if not self.images:
            raise ValueError(f"no questions in {ann_file}")
        self.has_answers = all(a is not None for a in self.answers)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        try:
            image = self.transform(self.stores[self.sources[index]].load(self.images[index]), random.Random(index))
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise RuntimeError(f"{self.ann_file}: question_id {self.question_ids[index]}: image "
                               f"{self.images[index]} cannot be read ({type(err).__name__}: {err})") from err
        return {"image": image, "question": self.questions[index], "index": index}


def answer_batch(tokenizer, answers: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Answers -> ids, mask [N,La]: `[CLS] a1 .. an [SEP]` padded with [PAD], never truncated
    (the reference appends its eos '[SEP]' to each answer; its tokenizer adds [CLS])."""
    pieces = tokenizer(list(answers), add_special_tokens=False)["input_ids"]
    length = 2 + max(len(p) for p in pieces)
    ids = torch.full((len(pieces), length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(pieces), length), dtype=torch.long)
    for row, p in enumerate(pieces):
        ids[row, :len(p) + 2] = torch.tensor([tokenizer.cls_token_id, *p, tokenizer.sep_token_id])
        mask[row, :len(p) + 2] = 1
    return ids, mask


class VQATrainCollate:
    """Train items -> a batch: images, questions (truncated at `max_tokens`), every question's answers."""

    def __init__(self, tokenizer, max_tokens: int):
        self.tokenizer, self.max_tokens = tokenizer, max_tokens

    def __call__(self, batch: Sequence[dict]) -> dict:
        question_ids, question_mask = text_batch(self.tokenizer, [b["question"] for b in batch], self.max_tokens)
        answer_ids, answer_mask = answer_batch(self.tokenizer, [a for b in batch for a in b["answers"]])
        return {
            "image": torch.stack([b["image"] for b in batch]),
            "question_ids": question_ids, "question_mask": question_mask,     # [B,Lq]
            "answer_ids": answer_ids, "answer_mask": answer_mask,             # [N,La]
            "answer_weights": torch.tensor([w for b in batch for w in b["weights"]], dtype=torch.float),
            "answer_counts": torch.tensor([len(b["answers"]) for b in batch], dtype=torch.long),   # [B]
            "load_failures": [f for b in batch for f in b["load_failures"]],
        }


class VQAEvalCollate:
    """Eval items -> images, questions (not truncated beyond `max_tokens`), dataset indices."""

    def __init__(self, tokenizer, max_tokens: int):
        self.tokenizer, self.max_tokens = tokenizer, max_tokens

    def __call__(self, batch: Sequence[dict]) -> dict:
        question_ids, question_mask = text_batch(self.tokenizer, [b["question"] for b in batch], self.max_tokens)
        return {"image": torch.stack([b["image"] for b in batch]), "question_ids": question_ids,
                "question_mask": question_mask, "index": torch.tensor([b["index"] for b in batch])}

