"""Pretraining recipe: ITC + ITM + MLM with momentum distillation on streamed WebDataset shards.

    deepspeed model/train.py --config configs/pretrain_4m.yaml --deepspeed_config ds_configs/zero2.json

What differs from the other tasks (docs/METHOD.md §2-§6): the batches come from
the shard loader (`pipeline.loader.ShardLoader`: lockstep ranks, exact resume);
the model is ALBEF with `vision.init` / `text.init` weights; the temperature is
clamped after every optimiser step (the optimiser's fp32 master copy too);
the feature queues are saved in checkpoints; with `train.eval_annotation` set,
zero-shot ITC retrieval on that held-out set every `train.eval_every` steps; the
export is the released ALBEF layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Union

import torch

from model.engine.recipe import Recipe
from model.engine.settings import DataSettings, TrainSettings
from model.engine.zero_params import clamp_parameter
from model.weights import build_albef
from model.weights.released import export_albef_state_dict


@dataclass
class PretrainTrain(TrainSettings):
    eval_annotation: Optional[str] = None   # held-out retrieval annotation file: zero-shot ITC R@K during training
    eval_image_root: Optional[str] = None   # folder the annotation's image paths are relative to
    eval_every: int = 2000                  # optimiser steps between evaluations (and one at the end)
    eval_max_tokens: int = 30               # caption truncation for retrieval, as the reference

    def check(self, where: str) -> None:
        super().check(where)
        if self.eval_every < 1:
            raise ValueError(f"{where}.eval_every={self.eval_every} must be a positive integer")
        if self.eval_annotation and not self.eval_image_root:
            raise ValueError(f"{where}.eval_annotation is set but {where}.eval_image_root is not")


@dataclass
class PretrainData(DataSettings):
    shards: Union[str, list[str], None] = None   # shard spec (pipeline/shards.py)
    resampled: bool = False                      # draw shards with replacement, honouring :weights
    shuffle_buffer: int = 1000                   # raw samples a loader worker permutes at a time
    allow_pipe: bool = False                     # accept `pipe:COMMAND` sources (they run shell commands)
    remote_timeout_s: float = 60.0               # longest remote open/read before it counts as failed
    remote_retries: int = 3                      # further tries of a failed remote read, with backoff
    device_augment: ClassVar[bool] = True        # the shard loader supports augment.on_device

    def check(self, where: str) -> None:
        super().check(where)
        if not self.shards:
            raise ValueError(f"{where}.shards is not set: give the training shard spec "
                             f"(e.g. {where}.shards=/data/cc3m/{{00000..00331}}.tar)")
        if self.shuffle_buffer < 0 or self.remote_retries < 0:
            raise ValueError(f"{where}.shuffle_buffer and {where}.remote_retries must not be negative")
        if self.remote_timeout_s <= 0:
            raise ValueError(f"{where}.remote_timeout_s={self.remote_timeout_s} must be positive")


class PretrainRecipe(Recipe):
    name = "pretrain"
    train_settings = PretrainTrain
    data_settings = PretrainData
    loss_names = ("loss_itc", "loss_itm", "loss_mlm")
    uses_queue = True

    def build_model(self, tokenizer, checkpoint: str | None):
        if checkpoint is not None:
            raise ValueError("pretraining starts from model.vision.init / model.text.init, not --checkpoint "
                             "(continue a run with --resume)")
        model = build_albef(self.run.model, global_batch_size=self.env.enqueue_batch)
        self._reports = [str(r) for r in model.init_reports]
        self.eval_set = self._eval_set()
        return model

    def load_report(self) -> str | None:
        return "\n".join(self._reports) or None

    def _eval_set(self):
        t = self.run.train
        if not t.eval_annotation:
            return None
        from pipeline.annotations import RetrievalEvalDataset
        from pipeline.transforms import ImageTransform
        return RetrievalEvalDataset(t.eval_annotation, t.eval_image_root,
                                    ImageTransform(self.run.model["vision"]["image_res"], train=False))

    def train_loader(self, tokenizer):
        from pipeline.loader import ShardLoader
        d, t = self.run.data, self.run.train
        loader = ShardLoader(d.shards, tokenizer, batch_size=t.batch_size_per_rank, rank=self.env.rank,
                             world_size=self.env.world, num_workers=d.num_workers, seed=t.seed, train=True,
                             image_res=self.run.model["vision"]["image_res"], max_tokens=t.max_tokens,
                             resampled=d.resampled, shuffle_buffer=d.shuffle_buffer, augment=d.augment,
                             pin_memory=self.env.device.type == "cuda", allow_pipe=d.allow_pipe,
                             remote_timeout_s=d.remote_timeout_s, remote_retries=d.remote_retries)
        self._loader = loader   # its `images` turns a batch into the model's input on the device
        return loader

    def images(self, batch: dict, device: torch.device) -> torch.Tensor:
        """The shard loader's uint8 pixels, copied to `device` and normalised (augmented first with
        data.augment.on_device) there (pipeline/loader.py)."""
        return self._loader.images(batch, device)

    def itc_chance(self) -> float:
        return 1.0 / (self.run.train.batch_size_per_rank + self.run.model["queue_size"])

    def step(self, module, batch, alpha, generator):
        device = self.env.device
        return module(self.images(batch, device),
                      batch["input_ids"].to(device, non_blocking=True),
                      batch["attention_mask"].to(device, non_blocking=True), alpha=alpha, generator=generator)

    def after_step(self, module) -> None:
        clamp_parameter(module.temp, self.run.model["temp_min"], self.run.model["temp_max"])

    def extra_state(self, module) -> dict:
        return {"queues": {name: buf.detach().cpu().clone() for name, buf in module.queue.named_buffers()}}

    def load_extra_state(self, module, state: dict) -> None:
        for name, value in state["queues"].items():
            getattr(module.queue, name).copy_(value)

    def export_state_dict(self, module) -> dict[str, torch.Tensor]:
        return export_albef_state_dict(module)

    def should_evaluate(self, step: int, epoch_ended: bool, last: bool) -> bool:
        return self.eval_set is not None and (step % self.run.train.eval_every == 0 or last)

    def evaluate(self, module, tokenizer, step: int, epoch: int) -> dict[str, float]:
        """Zero-shot ITC-only retrieval on the held-out set (collective: every rank computes it)."""
        from model.tasks.retrieval_eval import evaluate_itc
        m = evaluate_itc(module, self.eval_set, tokenizer, max_tokens=self.run.train.eval_max_tokens,
                         device=self.env.device)
        if self.env.rank == 0:
            print(f"[train] eval step {step}: TR@1/5/10 {m['txt_r1']:.1f}/{m['txt_r5']:.1f}/{m['txt_r10']:.1f} "
                  f"IR@1/5/10 {m['img_r1']:.1f}/{m['img_r5']:.1f}/{m['img_r10']:.1f} r_mean {m['r_mean']:.1f} "
                  f"({m['n_images']} images, {m['n_texts']} texts)", flush=True)
        return m


RECIPE = PretrainRecipe
