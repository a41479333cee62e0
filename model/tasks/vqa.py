"""VQA (VQA v2 + Visual Genome QA): the reference's fine-tuning recipe and its result files.

    deepspeed model/train.py --config configs/vqa.yaml --checkpoint ALBEF_4M.pth \
        --deepspeed_config ds_configs/zero2.json [--output-dir DIR] [k=v ...]
    python -m model.evaluate --config configs/vqa.yaml --checkpoint RUN_OR_FILE [--split test|val] [--output JSON]

What differs from the other tasks (docs/METHOD.md §11):
- Model: `model.vqa.ALBEFVQA`, the question fused with the image and an answer
  decoder initialised from the fusion layers and the MLM head of the pretrained
  checkpoint (`model.weights.vqa`); distillation from the momentum decoder,
  alpha ramped over the first epoch. Loss: per-answer summed token
  cross-entropy weighted by the answer's share of the human answers (VG answers:
  `data.vg_answer_weight`), summed over answers, divided by the number of questions.
- Data: the reference's annotation JSONs (`pipeline.vqa_data`) through the
  resumable `MapLoader`; a batch carries every distinct answer of its questions.
- Evaluation: every rank ranks the answers of its share of the questions
  (`eval.k_test` candidates, `eval.answer_score`); results are gathered,
  deduplicated and written as the evaluation server's JSON
  `[{"question_id", "answer"}]`; a split whose file has the human answers also
  gets the VQA accuracy. As the reference, training evaluates once, at the end
  (`results/vqa_result_<split>_step<N>.json` in the run folder); no model selection.
- Export: the reference's VQA checkpoint layout (`export/albef.pth`).

`python -m model.evaluate` writes the record (metrics, counts, warnings, load
report) to `--output` (default: next to the checkpoint) and the server file
beside it, `<output stem>.answers.json`.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from model.engine.recipe import Recipe
from model.engine.settings import DataSettings, EvalSettings, TrainSettings
from model.tasks.vqa_metrics import (answers_outside_list, check_complete, format_table, merge_results,
                                     vqa_accuracy, write_result_file)
from model.vqa import ANSWER_SCORES, ALBEFVQA
from model.weights.vqa import export_vqa_state_dict, load_vqa_weights


@dataclass
class VQATrain(TrainSettings):
    lr: float = 2e-5
    warmup_lr: float = 1e-5
    warmup_steps: int = 400              # the reference: 4 warm-up "epochs" of 100 iterations
    min_lr: float = 1e-6
    epochs: int = 8
    batch_size_per_rank: int = 32
    max_tokens: int = 25                 # training questions truncated here ([CLS] included)
    output_dir: str = "runs/vqa"


@dataclass
class VQAData(DataSettings):
    train_file: Union[list[str], str] = field(default_factory=list)   # VQA and VG question JSONs
    val_file: Optional[str] = None       # questions with their human answers: VQA accuracy
    test_file: Optional[str] = None      # questions only: the result file for the evaluation server
    answer_list: Optional[str] = None    # JSON list of the candidate answers ranked at test time
    vqa_root: Optional[str] = None       # folder of the `image` paths of "dataset": "vqa" entries
    vg_root: Optional[str] = None        # ... of "dataset": "vg" entries
    vqa_shards: Union[list[str], str, None] = None   # or tar shards holding the "vqa" images by those paths
    vg_shards: Union[list[str], str, None] = None    # ... the "vg" images (pipeline/image_store.py)
    vg_answer_weight: float = 0.5        # weight of a VG question's one answer (reference 0.5)
    max_question_words: int = 30         # pre_question word limit, training
    max_test_question_words: int = 50    # pre_question word limit, evaluation
    num_workers: int = 4

    def __post_init__(self) -> None:
        if isinstance(self.train_file, str):
            self.train_file = [self.train_file] if self.train_file else []

    def check(self, where: str) -> None:
        super().check(where)
        if self.vg_answer_weight < 0:
            raise ValueError(f"{where}.vg_answer_weight={self.vg_answer_weight} must not be negative")
        for name in ("max_question_words", "max_test_question_words"):
            if getattr(self, name) < 1:
                raise ValueError(f"{where}.{name}={getattr(self, name)} must be a positive integer")


@dataclass
class VQAEval(EvalSettings):
    k_test: int = 128                    # answers kept by first-token probability, then scored in full
    batch_size: int = 16                 # questions per rank per ranking batch (reference batch_size_test)
    answer_score: str = "reference"      # "reference": its formula (first token counted twice); "likelihood"

    def check(self, where: str) -> None:
        for name in ("k_test", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{where}.{name}={getattr(self, name)} must be a positive integer")
        if self.answer_score not in ANSWER_SCORES:
            raise ValueError(f"{where}.answer_score={self.answer_score!r} is unknown; known: "
                             f"{', '.join(ANSWER_SCORES)}")


def padded_share(n: int, rank: int, world: int) -> list[int]:
    """This rank's question indices: 0..n-1 padded by wrapping around to a multiple of `world`,
    then every world-th (as DistributedSampler without shuffling). Every rank gets the same count,
    so collective forwards (ZeRO-3) stay in step; the padding's duplicates are removed after gathering."""
    total = math.ceil(n / world) * world
    indices = [i % n for i in range(total)]
    return indices[rank:total:world]


@torch.no_grad()
def answer_questions(model: ALBEFVQA, dataset, answer_list: list[str], tokenizer, *, k: int, score: str,
                     batch_size: int, device: torch.device, rank: int = 0, world: int = 1,
                     num_workers: int = 0) -> list[dict]:
    """Collective: rank the answer list for this rank's share of `dataset`; every rank returns
    the merged `[{"question_id", "answer"}]` of all questions, in dataset order."""
    from pipeline.vqa_data import VQAEvalCollate, answer_batch
    model.eval()
    answer_ids, answer_mask = (t.to(device) for t in answer_batch(tokenizer, answer_list))
    collate = VQAEvalCollate(tokenizer, model.settings.text.max_position_embeddings)
    loader = DataLoader(Subset(dataset, padded_share(len(dataset), rank, world)), batch_size=batch_size,
                        shuffle=False, num_workers=num_workers, collate_fn=collate)
    rows = []
    for batch in loader:
        best = model.answer(batch["image"].to(device), batch["question_ids"].to(device),
                            batch["question_mask"].to(device), answer_ids, answer_mask, k, score)
        rows += [{"question_id": dataset.question_ids[i], "answer": answer_list[a]}
                 for i, a in zip(batch["index"].tolist(), best.tolist())]
    per_rank = [rows]
    if world > 1:
        per_rank = [None] * world
        dist.all_gather_object(per_rank, rows)
    merged = {row["question_id"]: row for row in merge_results(per_rank)}
    check_complete(merged, dataset.question_ids)
    return [merged[qid] for qid in dataset.question_ids]


class VQARecipe(Recipe):
    name = "vqa"
    train_settings = VQATrain
    data_settings = VQAData
    eval_settings = VQAEval
    loss_names = ("loss_vqa",)

    def __init__(self, run, env):
        super().__init__(run, env)
        self._report = None
        self._answer_list: list[str] | None = None
        self.eval_sets: dict = {}     # split -> dataset, evaluated at the end of training

    # ------------------------------------------------------------- model

    def build_model(self, tokenizer, checkpoint: str | None) -> ALBEFVQA:
        if not checkpoint:
            raise ValueError("task vqa fine-tunes a pretrained model: give --checkpoint (or train.init_checkpoint)")
        self.refuse_init_weights()
        cfg = copy.deepcopy(self.run.model)
        if tokenizer.sep_token_id is None:
            raise ValueError("the tokenizer has no [SEP]: VQA answers end with it")
        from model.albef import text_settings_from_tokenizer
        cfg["text"].update(text_settings_from_tokenizer(tokenizer))
        model = ALBEFVQA(cfg)
        self._report = load_vqa_weights(model, checkpoint)
        return model

    def load_report(self) -> str | None:
        return str(self._report) if self._report is not None else None

    def export_state_dict(self, module) -> dict[str, torch.Tensor]:
        return export_vqa_state_dict(module)

    # ------------------------------------------------------------- training

    def _roots(self) -> dict:
        """The image store of each `dataset` value (None where neither its folder nor its shards is set)."""
        from pipeline.image_store import image_store
        d = self.run.data
        return {name: image_store(root, shards, setting=f"data.{name}_root")
                if root is not None or shards else None
                for name, root, shards in (("vqa", d.vqa_root, d.vqa_shards), ("vg", d.vg_root, d.vg_shards))}

    def train_loader(self, tokenizer):
        from pipeline.map_loader import MapLoader
        from pipeline.transforms import AugmentConfig, ImageTransform
        from pipeline.vqa_data import VQATrainCollate, VQATrainDataset
        d, t = self.run.data, self.run.train
        if not d.train_file:
            raise ValueError("data.train_file is empty: give the VQA / VG question file(s)")
        transform = ImageTransform(self.run.model["vision"]["image_res"], train=True,
                                   augment=AugmentConfig.from_dict(d.augment))
        dataset = VQATrainDataset(d.train_file, self._roots(), transform, vg_weight=d.vg_answer_weight,
                                  max_words=d.max_question_words, seed=t.seed)
        self.eval_sets = {split: self.eval_dataset(split) for split in self.splits() if self._split_file(split)}
        if self.env.rank == 0:
            print(f"[train] {len(dataset)} training questions; evaluation at the end on "
                  f"{', '.join(self.eval_sets) or 'nothing (no data.val_file / data.test_file)'}", flush=True)
        return MapLoader(dataset, batch_size=t.batch_size_per_rank, rank=self.env.rank, world_size=self.env.world,
                         seed=t.seed, collate_fn=VQATrainCollate(tokenizer, t.max_tokens),
                         num_workers=d.num_workers, pin_memory=self.env.device.type == "cuda")

    def step(self, module, batch, alpha, generator):
        device = self.env.device
        keys = ("image", "question_ids", "question_mask", "answer_ids", "answer_mask", "answer_weights",
                "answer_counts")
        return module(*(batch[k].to(device, non_blocking=True) for k in keys), alpha=alpha)

    # ------------------------------------------------------------- evaluation

    def splits(self) -> tuple[str, ...]:
        return ("test", "val")

    def _split_file(self, split: str) -> str | None:
        return getattr(self.run.data, f"{split}_file", None)

    def answer_list(self) -> list[str]:
        from pipeline.vqa_data import read_answer_list
        if self._answer_list is None:
            if not self.run.data.answer_list:
                raise ValueError("data.answer_list is not set: evaluation ranks the answers of that list")
            self._answer_list = read_answer_list(self.run.data.answer_list)
        return self._answer_list

    def eval_dataset(self, split: str):
        from pipeline.transforms import ImageTransform
        from pipeline.vqa_data import VQAEvalDataset
        ann_file = self._split_file(split)
        if not ann_file:
            raise ValueError(f"data.{split}_file is not set")
        self.answer_list()   # a missing or bad answer list fails before any image is read
        return VQAEvalDataset(ann_file, self._roots(),
                              ImageTransform(self.run.model["vision"]["image_res"], train=False),
                              max_words=self.run.data.max_test_question_words)

    def run_split(self, module, tokenizer, dataset) -> tuple[list[dict], dict, list[str]]:
        """Collective: (result rows, metrics, warnings) of one split."""
        e, answers = self.run.eval, self.answer_list()
        t0 = time.perf_counter()
        rows = answer_questions(module, dataset, answers, tokenizer, k=e.k_test, score=e.answer_score,
                                batch_size=e.batch_size, device=self.env.device, rank=self.env.rank,
                                world=self.env.world, num_workers=self.run.data.num_workers)
        seconds = round(time.perf_counter() - t0, 3)
        metrics: dict = {"questions": len(rows)}
        warnings = []
        if dataset.has_answers:
            humans = dict(zip(dataset.question_ids, dataset.answers))
            metrics = vqa_accuracy({r["question_id"]: r["answer"] for r in rows}, humans)
            outside = answers_outside_list(humans, answers)
            metrics["questions_without_listed_answer"] = len(outside)
            if outside:
                qid = outside[0]
                warnings.append(f"{len(outside)} questions of {dataset.ann_file} have no human answer in the "
                                f"answer list and score 0 (e.g. question_id {qid}: {humans[qid][:3]}...)")
        metrics.update(answers_in_list=len(answers), seconds=seconds)
        return rows, metrics, warnings

    def should_evaluate(self, step: int, epoch_ended: bool, last: bool) -> bool:
        return last and bool(self.eval_sets)

    def evaluate(self, module, tokenizer, step: int, epoch: int) -> dict[str, dict[str, float]]:
        out = {}
        for split, dataset in self.eval_sets.items():
            rows, metrics, warnings = self.run_split(module, tokenizer, dataset)
            out[split] = metrics
            if self.env.rank == 0:
                write_result_file(rows, self.out_dir / "results" / f"vqa_result_{split}_step{step}.json")
                for line in warnings:
                    print(f"[vqa] warning: {line}", flush=True)
                print(format_table(metrics, f"step {step} {split}"), flush=True)
        return out

    def evaluate_split(self, module, tokenizer, split: str, options) -> dict:
        dataset = self.eval_dataset(split)
        rows, metrics, warnings = self.run_split(module, tokenizer, dataset)
        output = Path(options.output)
        result_file = output.with_name(f"{output.stem}.answers.json")
        if self.env.rank == 0:
            write_result_file(rows, result_file)
        e = self.run.eval
        record = {"config": options.config, "split": split, "annotation_file": dataset.ann_file,
                  "checkpoint": options.checkpoint, "load_report": str(self._report), "metrics": metrics,
                  "result_file": str(result_file), "k_test": e.k_test, "answer_score": e.answer_score,
                  "answer_list": self.run.data.answer_list, "warnings": warnings, "world_size": self.env.world}
        record["table"] = "\n".join([str(self._report), *(f"warning: {w}" for w in warnings),
                                     format_table(metrics, f"{self.run.name}/{split}"),
                                     f"result file: {result_file}"])
        return record


RECIPE = VQARecipe
