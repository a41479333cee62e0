"""Weakly supervised visual grounding (RefCOCO+): retrieval fine-tuning, then Grad-CAM box ranking.

    deepspeed model/train.py --config configs/grounding.yaml --checkpoint ALBEF.pth \
        --deepspeed_config ds_configs/zero2.json [--output-dir DIR] [k=v ...]
    python -m model.evaluate --config configs/grounding.yaml --checkpoint RUN_OR_FILE \
        [--split val|testA|testB] [--output JSON] [--save-heatmaps N]

What differs from retrieval fine-tuning (`model/tasks/retrieval.py`, whose
recipe this is; docs/METHOD.md §12):
- Data: referring expressions instead of captions, in the JSON form of
  `pipeline/grounding_data.py`; no box is used for training. `idx` numbers the
  image files, so the expressions of one picture are ITC positives of each other.
- Train transform: resize without a crop, flip, RandAugment (`ResizeFlipAugment`).
- Evaluation: for every expression, a Grad-CAM map of the ITM match logit on
  one fusion layer's cross-attention (`eval.gradcam_mode: itc` uses a ViT
  block's self-attention and the ITC similarity instead), proposals ranked on
  it, a hit at IoU >= 0.5 (`model/grounding.py`). Accuracy per split: `val`
  from `data.val_file`, `testA` and `testB` from `data.test_file` (one file
  holds both, as the reference's). The best val accuracy picks the export.

Result JSON (`model.evaluate`): metrics {acc, n, hits, no_positive, unscored},
one row per expression (chosen box, IoU, hit, or why it was not scored), the
annotation problems and the weight-loading report; `--save-heatmaps N` draws
the first N expressions into `<output stem>_heatmaps/`.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from model.grounding import GRADCAM_MODES, IOU_HIT, accuracy, ground, heatmaps
from model.tasks.classify import padded_share
from model.tasks.retrieval import RetrievalEval, RetrievalRecipe, RetrievalTrain

SPLIT_FILES = {"val": "val_file", "testA": "test_file", "testB": "test_file"}   # split -> data key


@dataclass
class GroundingTrain(RetrievalTrain):
    max_tokens: int = 512                # no truncation, as the reference (expressions are cut at 30 words)
    output_dir: str = "runs/grounding"


@dataclass
class GroundingEval(RetrievalEval):
    """`image_batch_size`: expressions per forward. k_test and text_batch_size are retrieval's
    (inherited with configs/retrieval_base.yaml) and unused here."""
    gradcam_mode: str = "itm"            # itm: fusion cross-attention + ITM logit; itc: ViT block + ITC similarity
    gradcam_layer: int = 2               # itm: fusion layer index (2 = BERT layer 8); itc: ViT block index

    def check(self, where: str) -> None:
        super().check(where)
        if self.gradcam_mode not in GRADCAM_MODES:
            raise ValueError(f"{where}.gradcam_mode={self.gradcam_mode!r} is unknown; known: "
                             f"{', '.join(GRADCAM_MODES)}")
        if self.gradcam_layer < 0:
            raise ValueError(f"{where}.gradcam_layer={self.gradcam_layer} must not be negative")


def run_grounding(model, dataset, tokenizer, *, mode: str, layer: int, batch_size: int, max_tokens: int,
                  device: torch.device, rank: int = 0, world: int = 1, num_workers: int = 0,
                  keep_maps: int = 0) -> tuple[list[dict], dict[int, torch.Tensor]]:
    """Collective: (one outcome per expression, in dataset order; the maps [g,g] of expressions < keep_maps).

    Every rank runs the same number of batches (`padded_share`), so a ZeRO-3
    model never waits on a rank that has finished; an entry that cannot be
    scored is run on a blank image and then discarded.
    """
    from pipeline.grounding_data import GroundingEvalCollate
    collate = GroundingEvalCollate(tokenizer, max_tokens, dataset.transform.image_res)
    loader = DataLoader(Subset(dataset, padded_share(len(dataset), rank, world)), batch_size=batch_size,
                        collate_fn=collate, num_workers=num_workers)
    mine, maps = {}, {}
    for batch in loader:
        cams = heatmaps(model, batch["image"].to(device), batch["input_ids"].to(device),
                        batch["attention_mask"].to(device), mode, layer).cpu()           # [B,g,g]
        for index, cam, frame, error in zip(batch["index"], cams, batch["frame"], batch["error"]):
            entry = dataset.entries[index]
            if error is not None:
                outcome = {"pred_box": None, "iou": None, "hit": False, "no_positive": False, "reason": error}
            else:
                outcome = {**ground(cam, *frame, entry["proposals"], entry["box"]), "reason": None}
            mine[index] = {**outcome, "unscored": error is not None}
            if index < keep_maps:
                maps[index] = cam
    if world > 1:
        shares = [None] * world
        dist.all_gather_object(shares, (mine, maps))
        mine = {i: row for share, _ in shares for i, row in share.items()}
        maps = {i: cam for _, share in shares for i, cam in share.items()}
    outcomes = []
    for index, entry in enumerate(dataset.entries):
        outcomes.append({"index": index, "split": dataset.split, "file": entry["file"], "entry": entry["entry"],
                         "ref_id": entry["ref_id"], "image_id": entry["image_id"],
                         "expression": entry["expression"], "box": entry["box"], **mine[index]})
    return outcomes, maps


def format_table(metrics: dict, title: str) -> str:
    return (f"{title}: acc {metrics['acc']:.2f} ({metrics['hits']}/{metrics['n']} expressions at IoU >= {IOU_HIT}; "
            f"no proposal above 0: {metrics['no_positive']}; unscored: {metrics['unscored']})")


class GroundingRecipe(RetrievalRecipe):
    name = "grounding"
    train_settings = GroundingTrain
    eval_settings = GroundingEval
    select_metric = "val/acc"

    # ------------------------------------------------------------- training

    def train_dataset(self):
        from pipeline.grounding_data import GroundingTrainDataset, ResizeFlipAugment
        from pipeline.transforms import AugmentConfig
        d = self.run.data
        if not d.train_file:
            raise ValueError("data.train_file is empty: give the training expression file(s)")
        transform = ResizeFlipAugment(self.run.model["vision"]["image_res"], AugmentConfig.from_dict(d.augment))
        return GroundingTrainDataset(d.train_file, d.images(), transform, max_words=d.max_words,
                                     seed=self.run.train.seed)

    # ------------------------------------------------------------- evaluation

    def splits(self) -> tuple[str, ...]:
        """val, testA, testB: those whose file is set (val first, the default of `model.evaluate`)."""
        return tuple(split for split in SPLIT_FILES if self._split_file(split)) or ("val",)

    def _split_file(self, split: str) -> str | None:
        return getattr(self.run.data, SPLIT_FILES[split]) if split in SPLIT_FILES else None

    def eval_dataset(self, split: str):
        from pipeline.grounding_data import GroundingEvalDataset
        from pipeline.transforms import ImageTransform
        if split not in SPLIT_FILES:
            raise ValueError(f"split {split!r} is not a grounding split; known: {', '.join(SPLIT_FILES)}")
        ann_file = self._split_file(split)
        if not ann_file:
            raise ValueError(f"split {split} needs data.{SPLIT_FILES[split]}, which is not set")
        return GroundingEvalDataset(ann_file, self.run.data.images(), split,
                                    ImageTransform(self.run.model["vision"]["image_res"], train=False),
                                    max_words=self.run.data.max_words)

    def _run_split(self, module, tokenizer, dataset, keep_maps: int = 0) -> tuple[dict, dict]:
        """(the result record of one split, the kept maps)."""
        e = self.run.eval
        start = time.perf_counter()
        outcomes, maps = run_grounding(module, dataset, tokenizer, mode=e.gradcam_mode, layer=e.gradcam_layer,
                                       batch_size=e.image_batch_size, max_tokens=self.run.train.max_tokens,
                                       device=self.env.device, rank=self.env.rank, world=self.env.world,
                                       num_workers=self.run.data.num_workers, keep_maps=keep_maps)
        metrics = accuracy(outcomes)[dataset.split]
        record = {"task": self.name, "split": dataset.split, "metrics": metrics,
                  "gradcam": {"mode": e.gradcam_mode, "layer": e.gradcam_layer}, "results": outcomes,
                  "problems": dataset.problems, "timings_s": {"total": time.perf_counter() - start},
                  "world_size": self.env.world}
        return record, maps

    def evaluate(self, module, tokenizer, step: int, epoch: int) -> dict[str, dict[str, float]]:
        """Every split with a file (the sets built by `train_loader`); the records go beside the best
        export (`save_best`, as retrieval's)."""
        metrics = {}
        for split, dataset in self.eval_sets.items():
            record, _ = self._run_split(module, tokenizer, dataset)
            self._records[split] = {**record, "init_checkpoint": self.source, "config": self.run.name,
                                    "epoch": epoch, "step": step}
            metrics[split] = record["metrics"]
            if self.env.rank == 0:
                print("[train] " + format_table(record["metrics"], f"epoch {epoch} step {step} {split}"), flush=True)
        return metrics

    def evaluate_split(self, module, tokenizer, split: str, options: argparse.Namespace) -> dict:
        dataset = self.eval_dataset(split)
        keep = max(options.save_heatmaps, 0)
        record, maps = self._run_split(module, tokenizer, dataset, keep_maps=keep)
        record.update(checkpoint=options.checkpoint, config=options.config, file=self._split_file(split),
                      load_report=str(self._report), heatmaps=None)
        if keep and self.env.rank == 0:
            record["heatmaps"] = str(self._draw(dataset, record["results"], maps, options.output))
        lines = [str(self._report)]
        if dataset.problems:
            lines.append(f"annotation problems: {len(dataset.problems)} (each listed in the JSON)")
        lines.append(format_table(record["metrics"], f"{self.name} {split}"))
        if record["heatmaps"]:
            lines.append(f"heatmaps: {record['heatmaps']}")
        record["table"] = "\n".join(lines)
        return record

    @staticmethod
    def _draw(dataset, results: list[dict], maps: dict[int, torch.Tensor], output: str) -> Path:
        """PNGs of the first expressions (those with a map), `<output stem>_heatmaps/NNNNN.png`."""
        from model.tasks.grounding_draw import draw_grounding
        folder = Path(output).with_name(Path(output).stem + "_heatmaps")
        for index in sorted(maps):
            entry, row = dataset.entries[index], results[index]
            if row["unscored"]:
                continue
            frame = (entry["height"], entry["width"]) if entry["height"] else None   # None: the image's size
            draw_grounding(folder / f"{index:05d}.png", dataset.store.load(entry["image"]), frame, maps[index], entry["expression"],
                           entry["box"], row["pred_box"], entry["proposals"], row["iou"])
        return folder


RECIPE = GroundingRecipe
