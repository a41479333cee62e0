"""The fine-tuning recipe SNLI-VE and NLVR2 share: a classifier on the fused [CLS] (docs/METHOD.md §9, §10).

`model/tasks/ve.py` and `model/tasks/nlvr.py` only name their annotation
format, labels and number of images; everything else is here:

- Model: `model.classifier.ALBEFClassifier`, every weight from `--checkpoint`
  (`model.weights.classifier`: the load report lists each unused or missing
  key with its reason); `train.distill` adds the momentum teacher.
- Data: the annotation files (`pipeline.classify_data`) through the resumable
  `MapLoader` (DistributedSampler order, `drop_last`, as the reference).
- Alpha: the engine's (`train.alpha_warmup`: ramped from 0 over the first epoch,
  the reference's `warm_up` (NLVR2); false: `train.alpha` from the first step (SNLI-VE)).
- Evaluation after every epoch on each `data.eval_files` split; the best
  `select_metric` (val or dev accuracy, as the reference's checkpoint_best)
  picks the export, with its per-example predictions beside it
  (`export/albef.<split>.json`). Every rank predicts an equal share (padded),
  so ZeRO-3's collective forwards stay in step.
- Export: the reference's layout of the task model (`export/albef.pth`).
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from model.classifier import ALBEFClassifier
from model.engine.recipe import Recipe
from model.engine.settings import EvalSettings, ImageData, TrainSettings
from model.weights.classifier import export_classifier_state_dict, load_classifier_state_dict
from pipeline.classify_data import ClassifyCollate, ClassifyDataset, EvalDataset, read_examples


@dataclass
class ClassifyTrain(TrainSettings):
    distill: bool = True          # momentum teacher: (1-alpha) CE + alpha CE against its softmax


@dataclass
class ClassifyData(ImageData):
    train_file: Union[list[str], str] = field(default_factory=list)
    eval_files: dict[str, str] = field(default_factory=dict)   # split name -> annotation file
    max_words: int = 30                  # pre_caption word limit

    def __post_init__(self) -> None:
        if isinstance(self.train_file, str):
            self.train_file = [self.train_file] if self.train_file else []

    def check(self, where: str) -> None:
        super().check(where)
        if self.max_words < 1:
            raise ValueError(f"{where}.max_words={self.max_words} must be a positive integer")


@dataclass
class ClassifyEval(EvalSettings):
    batch_size: int = 64                 # records per rank per forward

    def check(self, where: str) -> None:
        if self.batch_size < 1:
            raise ValueError(f"{where}.batch_size={self.batch_size} must be a positive integer")


def padded_share(n: int, rank: int, world: int) -> list[int]:
    """This rank's record indices: 0..n-1 wrapped to a multiple of `world`, every world-th
    (equal counts on all ranks; the wrapped duplicates are dropped after gathering)."""
    total = math.ceil(n / world) * world
    return [i % n for i in range(total)][rank:total:world]


@torch.no_grad()
def predict(model: ALBEFClassifier, dataset: EvalDataset, collate: ClassifyCollate, *, batch_size: int,
            device: torch.device, rank: int = 0, world: int = 1, num_workers: int = 0) -> dict[int, dict]:
    """Collective: every record's class probabilities on all ranks: {index: {"probs", "error"}}."""
    was_training = model.training
    model.eval()
    # its own generator: iterating must not draw from torch's global one (a run's dropout stream, and
    # with it a resumed run's equality with the uninterrupted one, must not depend on when it evaluated)
    loader = DataLoader(Subset(dataset, padded_share(len(dataset), rank, world)), batch_size=batch_size,
                        collate_fn=collate, num_workers=num_workers, generator=torch.Generator())
    mine = {}
    for batch in loader:
        logits = model.logits(batch["image"].to(device), batch["input_ids"].to(device),
                              batch["attention_mask"].to(device))
        for index, probs, error in zip(batch["index"].tolist(), F.softmax(logits.float(), -1).cpu().tolist(),
                                       batch["error"]):
            mine[index] = {"probs": probs, "error": error}
    model.train(was_training)
    if world == 1:
        return mine
    shares = [None] * world
    dist.all_gather_object(shares, mine)
    return {index: row for share in shares for index, row in share.items()}


def score(dataset: EvalDataset, rows: dict[int, dict], labels: tuple[str, ...]) -> tuple[dict, list[dict]]:
    """(metrics, per-record predictions): accuracy and per-class accuracy in percent; a record whose
    image could not be read counts as wrong and has prediction null."""
    predictions, hits = [], {name: [0, 0] for name in labels}
    for index, ex in enumerate(dataset.examples):
        row = rows[index]
        pred = None if row["error"] else max(range(len(labels)), key=row["probs"].__getitem__)
        hit = hits[labels[ex.label]]
        hit[0] += pred == ex.label
        hit[1] += 1
        predictions.append({"index": index, "file": ex.file, "record": ex.entry, "images": list(ex.images),
                            "sentence": ex.sentence,
                            "label": labels[ex.label], "prediction": None if pred is None else labels[pred],
                            "probs": [round(p, 5) for p in row["probs"]], "error": row["error"]})
    total = sum(h[0] for h in hits.values())
    metrics = {"acc": 100.0 * total / len(dataset.examples), "n": len(dataset.examples),
               "unreadable": sum(p["error"] is not None for p in predictions)}
    metrics.update({f"acc_{name}": 100.0 * h[0] / h[1] for name, h in hits.items() if h[1]})
    return metrics, predictions


def format_table(metrics: dict, labels: tuple[str, ...], title: str) -> str:
    per_class = "  ".join(f"{name} {metrics[f'acc_{name}']:.2f}" for name in labels if f"acc_{name}" in metrics)
    return f"{title}: acc {metrics['acc']:.2f} ({metrics['n']} records)  per class: {per_class}"


class ClassifyRecipe(Recipe):
    """Subclasses set `name`, `kind` (annotation reader), `labels`, `num_images`, `select_metric`."""
    kind: ClassVar[str]
    labels: ClassVar[tuple[str, ...]]
    num_images: ClassVar[int]
    train_settings = ClassifyTrain
    data_settings = ClassifyData
    eval_settings = ClassifyEval
    loss_names = ("loss_cls",)
    evaluate_every_epoch = True

    # ------------------------------------------------------------- model

    def teacher_init(self) -> str:
        return "after_load"

    def build_model(self, tokenizer, checkpoint: str | None) -> ALBEFClassifier:
        self.refuse_init_weights()
        m = self.run.model
        model = ALBEFClassifier(m, len(self.labels), self.num_images, distill=self.run.train.distill)
        if checkpoint is None:
            self._report = "no --checkpoint: random initialisation"
        else:
            from model.weights.files import read_checkpoint
            state, source = read_checkpoint(checkpoint)
            self._report = str(load_classifier_state_dict(model, state, source, self.teacher_init()))
        return model

    def load_report(self) -> str | None:
        return self._report

    def export_state_dict(self, module) -> dict[str, torch.Tensor]:
        return export_classifier_state_dict(module)

    # ------------------------------------------------------------- training

    def train_loader(self, tokenizer):
        from pipeline.map_loader import MapLoader
        from pipeline.transforms import AugmentConfig, ImageTransform
        d, t = self.run.data, self.run.train
        if not d.train_file:
            raise ValueError("data.train_file is empty: give the training annotation file(s)")
        transform = ImageTransform(self.run.model["vision"]["image_res"], train=True,
                                   augment=AugmentConfig.from_dict(d.augment))
        images = d.images()
        dataset = ClassifyDataset(read_examples(self.kind, d.train_file, images, d.max_words), transform,
                                  seed=t.seed, images=images)
        return MapLoader(dataset, batch_size=t.batch_size_per_rank, rank=self.env.rank, world_size=self.env.world,
                         seed=t.seed, collate_fn=ClassifyCollate(tokenizer, t.max_tokens),
                         num_workers=d.num_workers, pin_memory=self.env.device.type == "cuda")

    def step(self, module, batch, alpha, generator):
        device = self.env.device
        return module(batch["image"].to(device, non_blocking=True),
                      batch["input_ids"].to(device, non_blocking=True),
                      batch["attention_mask"].to(device, non_blocking=True),
                      batch["label"].to(device, non_blocking=True), alpha=alpha)

    # ------------------------------------------------------------- evaluation

    def splits(self) -> tuple[str, ...]:
        """The `data.eval_files` splits, "test" first (the default of `model.evaluate`)."""
        return tuple(sorted(self.run.data.eval_files, key=lambda split: split != "test")) or ("test",)

    def _eval_set(self, split: str) -> EvalDataset:
        from pipeline.transforms import ImageTransform
        d = self.run.data
        if split not in d.eval_files:
            known = ", ".join(d.eval_files) or "none"
            raise ValueError(f"split {split!r} has no file: data.eval_files has {known}")
        images = d.images()
        return EvalDataset(read_examples(self.kind, d.eval_files[split], images, d.max_words),
                           ImageTransform(self.run.model["vision"]["image_res"], train=False), images=images)

    def _run_split(self, module, tokenizer, split: str) -> tuple[dict, list[dict]]:
        dataset = self._eval_set(split)
        rows = predict(module, dataset, ClassifyCollate(tokenizer, self.run.train.max_tokens),
                       batch_size=self.run.eval.batch_size, device=self.env.device, rank=self.env.rank,
                       world=self.env.world, num_workers=self.run.data.num_workers)
        return score(dataset, rows, self.labels)

    def evaluate(self, module, tokenizer, step: int, epoch: int) -> dict[str, dict[str, float]]:
        metrics, self._predictions = {}, {}
        for split in self.splits():
            metrics[split], self._predictions[split] = self._run_split(module, tokenizer, split)
            if self.env.rank == 0:
                print("[train] " + format_table(metrics[split], self.labels, f"epoch {epoch} step {step} {split}"),
                      flush=True)
        return metrics

    def save_best(self, export_dir: Path) -> None:
        for split, predictions in self._predictions.items():
            (export_dir / f"albef.{split}.json").write_text(json.dumps(predictions) + "\n")

    def evaluate_split(self, module, tokenizer, split: str, options: argparse.Namespace) -> dict:
        metrics, predictions = self._run_split(module, tokenizer, split)
        return {"task": self.name, "split": split, "file": self.run.data.eval_files[split],
                "checkpoint": options.checkpoint, "load_report": self._report, "metrics": metrics,
                "labels": list(self.labels), "predictions": predictions,
                "table": format_table(metrics, self.labels, f"{self.name} {split}")}
