"""Image-text retrieval (Flickr30K / COCO): the reference's fine-tuning recipe and its evaluation.

    deepspeed model/train.py --config configs/retrieval_coco.yaml --checkpoint ALBEF_4M.pth \
        --deepspeed_config ds_configs/zero2.json [--output-dir DIR] [k=v ...]
    python -m model.evaluate --config configs/retrieval_flickr.yaml --checkpoint CKPT [--split val]
    (aliases: python -m model.retrieval finetune|evaluate ...)

What differs from pretraining (docs/METHOD.md §8):
- Model: ALBEF in retrieval mode (`idx` = image number): ITC targets spread over
  every caption of the same image, in the batch and in `idx_queue`; ITM hard
  negatives never share the image; momentum distillation; no MLM. Weights from
  `--checkpoint` (position embedding resized to 384); the temperature is not clamped.
- Data: the Karpathy train file(s) as a map-style dataset (`pipeline.map_loader.MapLoader`:
  shuffled per epoch, padded so every rank has the same number of full batches).
  Augmentation: RandomResizedCrop(scale 0.5-1.0), flip, RandAugment.
- Schedule: cosine stepped every optimiser step (the reference steps per epoch).
- After every epoch: the full evaluation (ITC top-k + ITM re-ranking) on val and
  test; the epoch with the best val `r_mean` (test when there is no val file) is
  exported in the released layout to `export/albef.pth`, with its result JSONs
  beside it (`export/albef.<config>_<split>.json`). Per-epoch results:
  `logs/epochs.jsonl`; annotation problems: `logs/train_problems.json`.

`python -m model.evaluate` writes, next to the checkpoint (or `--output`),
`<checkpoint>.<config>_<split>.json`: metrics, per-query ranks (0-based; null =
unscored), unscored queries with reasons, per-item problems of the annotation
file, the weight-loading report and timings; `--save-scores` adds the two score
matrices as `.npz`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from model.albef import ALBEF
from model.engine.recipe import Recipe
from model.engine.settings import EvalSettings, ImageData, TrainSettings
from model.weights.files import load_retrieval_weights, retrieval_model_config
from model.weights.released import export_albef_state_dict

RESULT_PREFIX = "albef"   # export/albef.<config>_<split>.json beside export/albef.pth


@dataclass
class RetrievalTrain(TrainSettings):
    lr: float = 1e-5
    warmup_lr: float = 1e-5
    warmup_steps: int = 0
    min_lr: float = 1e-6
    batch_size_per_rank: int = 32
    max_tokens: int = 30
    output_dir: str = "runs/retrieval"


@dataclass
class RetrievalData(ImageData):
    train_file: Union[list[str], str] = field(default_factory=list)   # Karpathy train JSON(s)
    val_file: Optional[str] = None       # picks the best epoch when set
    test_file: Optional[str] = None
    max_words: int = 30                  # pre_caption word limit
    num_workers: int = 4

    def __post_init__(self) -> None:
        if isinstance(self.train_file, str):
            self.train_file = [self.train_file] if self.train_file else []


@dataclass
class RetrievalEval(EvalSettings):
    k_test: int = 128                    # candidates per query re-ranked by the ITM head
    image_batch_size: int = 64
    text_batch_size: int = 256
    precision: str = "fp32"              # fp32 | bf16 (autocast for features and ITM re-ranking)

    def check(self, where: str) -> None:
        for name in ("k_test", "image_batch_size", "text_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{where}.{name}={getattr(self, name)} must be a positive integer")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"{where}.precision={self.precision!r} must be fp32 or bf16")


class RetrievalRecipe(Recipe):
    name = "retrieval"
    train_settings = RetrievalTrain
    data_settings = RetrievalData
    eval_settings = RetrievalEval
    loss_names = ("loss_itc", "loss_itm")
    select_metric = "val/r_mean"
    evaluate_every_epoch = True
    uses_queue = True

    def __init__(self, run, env):
        super().__init__(run, env)
        self._records: dict[str, dict] = {}
        self._report = None

    # ------------------------------------------------------------- model

    def build_model(self, tokenizer, checkpoint: str | None) -> ALBEF:
        if not checkpoint:
            raise ValueError(f"task {self.name} fine-tunes a pretrained model: give --checkpoint "
                             f"(or train.init_checkpoint)")
        model = ALBEF(retrieval_model_config(self.run.model, tokenizer),
                      global_batch_size=(self.env.enqueue_batch or None) if self.env else None)
        self._report, self.source = load_retrieval_weights(model, checkpoint)
        return model

    def load_report(self) -> str | None:
        return str(self._report) if self._report is not None else None

    def export_state_dict(self, module) -> dict[str, torch.Tensor]:
        return export_albef_state_dict(module)

    def extra_state(self, module) -> dict:
        return {"queues": {name: buf.detach().cpu().clone() for name, buf in module.queue.named_buffers()}}

    def load_extra_state(self, module, state: dict) -> None:
        for name, value in state["queues"].items():
            getattr(module.queue, name).copy_(value)

    # ------------------------------------------------------------- training

    def train_dataset(self):
        """The annotation dataset and its transform; the grounding recipe gives its own."""
        from pipeline.annotations import RetrievalTrainDataset
        from pipeline.transforms import AugmentConfig, ImageTransform
        d = self.run.data
        if not d.train_file:
            raise ValueError("data.train_file is empty: give the training annotation file(s)")
        transform = ImageTransform(self.run.model["vision"]["image_res"], train=True,
                                   augment=AugmentConfig.from_dict(d.augment))
        return RetrievalTrainDataset(d.train_file, d.images(), transform, max_words=d.max_words,
                                     seed=self.run.train.seed)

    def train_loader(self, tokenizer):
        from pipeline.annotations import TrainCollate
        from pipeline.map_loader import MapLoader
        dataset = self.train_dataset()
        self.eval_sets = {split: self.eval_dataset(split) for split in self.splits() if self._split_file(split)}
        if not self.eval_sets:
            raise ValueError("neither data.val_file nor data.test_file is set: nothing to select the model by")
        if self.env.rank == 0 and self.out_dir is not None:   # not in a --dry-run
            problems = dataset.problems
            (self.out_dir / "logs").mkdir(parents=True, exist_ok=True)
            (self.out_dir / "logs" / "train_problems.json").write_text(json.dumps(problems))
            print(f"[train] {len(dataset)} pairs / {dataset.n_images} images"
                  + (f"; {len(problems)} annotation entries left out or merged (logs/train_problems.json)"
                     if problems else ""), flush=True)
        t = self.run.train
        return MapLoader(dataset, batch_size=t.batch_size_per_rank, rank=self.env.rank, world_size=self.env.world,
                         seed=t.seed, collate_fn=TrainCollate(tokenizer, t.max_tokens),
                         num_workers=self.run.data.num_workers, pin_memory=self.env.device.type == "cuda")

    def itc_chance(self) -> float:
        return 1.0 / (self.run.train.batch_size_per_rank + self.run.model["queue_size"])

    def step(self, module, batch, alpha, generator):
        device = self.env.device
        return module(batch["image"].to(device, non_blocking=True),
                      batch["input_ids"].to(device, non_blocking=True),
                      batch["attention_mask"].to(device, non_blocking=True), alpha=alpha,
                      idx=batch["idx"].to(device, non_blocking=True), generator=generator)

    # ------------------------------------------------------------- evaluation

    def splits(self) -> tuple[str, ...]:
        return ("test", "val")

    def _split_file(self, split: str) -> str | None:
        return getattr(self.run.data, f"{split}_file", None)

    def eval_dataset(self, split: str):
        from pipeline.annotations import RetrievalEvalDataset
        from pipeline.transforms import ImageTransform
        ann_file = self._split_file(split)
        if not ann_file:
            raise ValueError(f"data.{split}_file is not set")
        return RetrievalEvalDataset(ann_file, self.run.data.images(),
                                    ImageTransform(self.run.model["vision"]["image_res"], train=False),
                                    max_words=self.run.data.max_words)

    def _run_evaluation(self, module, dataset, tokenizer):
        from model.tasks.retrieval_eval import evaluate
        e = self.run.eval
        return evaluate(module, dataset, tokenizer, k_test=e.k_test, max_tokens=self.run.train.max_tokens,
                        image_batch_size=e.image_batch_size, text_batch_size=e.text_batch_size,
                        device=self.env.device, num_workers=self.run.data.num_workers, precision=e.precision)

    def _record(self, result, dataset, timings: dict, **extra) -> dict:
        """The JSON written after an evaluation: metrics, per-query ranks, problems, timings."""
        return {**extra, **result.to_json(), "annotation_file": dataset.ann_file, "problems": dataset.problems,
                "problem_counts": dataset.problem_counts(), "timings_s": timings,
                "k_test": self.run.eval.k_test, "world_size": self.env.world}

    def evaluate(self, module, tokenizer, step: int, epoch: int) -> dict[str, dict[str, float]]:
        from model.tasks.retrieval_metrics import format_table
        metrics = {}
        for split in ("val", "test"):
            if split not in self.eval_sets:
                continue
            dataset = self.eval_sets[split]
            result, timings, _ = self._run_evaluation(module, dataset, tokenizer)
            self._records[split] = self._record(result, dataset, timings, init_checkpoint=self.source,
                                                config=self.run.name, split=split, epoch=epoch, step=step)
            metrics[split] = result.metrics
            if self.env.rank == 0:
                print(format_table(result.metrics, f"ep {epoch} {split}"), flush=True)
        return metrics

    def save_best(self, export_dir: Path) -> None:
        for split, record in self._records.items():
            (export_dir / f"{RESULT_PREFIX}.{self.run.name}_{split}.json").write_text(json.dumps(record) + "\n")

    def evaluate_split(self, module, tokenizer, split: str, options) -> dict:
        from model.tasks.retrieval_metrics import format_table
        dataset = self.eval_dataset(split)
        result, timings, scores = self._run_evaluation(module, dataset, tokenizer)
        record = self._record(result, dataset, timings, checkpoint=self.source, config=options.config,
                              split=split, load_report=str(self._report))
        if getattr(options, "save_scores", False) and self.env.rank == 0:
            np.savez_compressed(Path(options.output).with_suffix(".npz"), i2t=scores[0], t2i=scores[1])
        lines = [str(self._report)]
        if dataset.problems:
            lines.append(f"annotation problems: {dataset.problem_counts()} (each listed in the JSON)")
        lines.append(format_table(result.metrics, f"{self.run.name}/{split}"))
        m = result.metrics
        if "itc_distinct_sets_i2t" in m:
            lines.append(f"ITC stage: {m['itc_distinct_sets_i2t']} distinct top-{self.run.eval.k_test} candidate "
                         f"sets for {m['n_images'] - m['n_unscored_images']} image queries, "
                         f"{m.get('itc_distinct_sets_t2i', 0)} for {m['n_texts'] - m['n_unscored_texts']} text queries"
                         + ("  <- the ITC features have collapsed: the ITM head re-ranks the same candidates"
                            " for every query" if min(m.get("itc_distinct_frac_i2t", 1), m.get("itc_distinct_frac_t2i", 1))
                            < 0.1 else ""))
        record["table"] = "\n".join(lines)
        return record


RECIPE = RetrievalRecipe
