"""ALBEF pretraining inside a DeepSpeed engine, streaming WebDataset shards.

    deepspeed [--num_gpus N] model/train.py --config configs/pretrain_4m.yaml \
        --deepspeed_config ds_configs/zero2.json [--output-dir DIR] \
        [--resume auto|PATH] [--max-steps N] [key=value ...]
    srun python model/train.py ...        (rendezvous from the Slurm environment)

The recipe (optimiser, schedule, batch, epochs) is the run config's `train:`
section, paper values by default (spec section 3); the DeepSpeed JSON says how
the engine runs (ZeRO stage, precision). Batch settings and the queue size are
checked against each other before any data is read.

Per optimiser step: the forward runs under DeepSpeed's torch_autocast (bf16 on
GPUs; the module, the momentum copies and the queues stay fp32), the
optimiser's master copy of the temperature is clamped like the module's, and
every rank appends a record (losses, queue and momentum checksums, batch
fingerprint, memory) to logs/records_rank{R}.jsonl. Every `train.log_every`
steps rank 0 prints the progress line and writes metrics; every
`train.checkpoint_every` steps (and at the end, and on a stop request) all
ranks write a checkpoint; with `train.eval_annotation` set, zero-shot ITC
retrieval on that held-out set every `train.eval_every` steps. At the end:
export/albef.pth (released layout) and plots.

Run folder: config.yaml, ds_config.json, checkpoints/, logs/ (metrics.csv,
eval.csv, tb/, records_rank{R}.jsonl), plots/, export/albef.pth.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    # `deepspeed model/train.py` runs this file as a script: make the repo importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from deepspeed.utils import (safe_get_full_fp32_param, safe_get_local_fp32_param, safe_set_full_fp32_param,
                             safe_set_local_fp32_param)

from model.albef import ALBEF, text_settings_from_tokenizer
from model.checkpointing import CheckpointManager, capture_rng, complete_tags, restore_rng
from model.checksums import QUEUE_BUFFERS, batch_fingerprint, local_tensor, momentum_checksum, momentum_params, \
    queue_checksum
from model.config import load_config, save_config
from model.dist_env import apply_slurm_env, init_engine_process_group
from model.engine_config import BatchPlan, load_ds_config, resolve_ds_config, zero_stage
from model.export import export_engine
from model.plot import plot_run
from model.preemption import StopRequest
from model.progress import (MetricsLog, StepRecords, Throughput, memory_mb, peak_memory_mb, progress_line,
                            reset_peak_memory)
from model.retrieval_eval import evaluate_itc
from model.schedule import LRSchedule, alpha_at
from pipeline.annotations import RetrievalEvalDataset
from pipeline.loader import ShardLoader
from pipeline.tokenize import load_tokenizer
from pipeline.transforms import ImageTransform

LOSS_AND_METRIC_KEYS = ("loss", "loss_itc", "loss_itm", "loss_mlm", "acc_itc", "acc_itm", "acc_mlm")
REQUIRED = {
    "train": ("lr", "warmup_lr", "warmup_steps", "min_lr", "weight_decay", "epochs", "alpha",
              "batch_size_per_rank", "max_tokens", "gradient_accumulation_steps", "betas", "eps", "seed",
              "output_dir", "log_every", "checkpoint_every", "keep_checkpoints", "stop_signals",
              "dist_timeout_s", "eval_annotation", "eval_image_root", "eval_every", "eval_max_tokens"),
    "data": ("shards", "num_workers", "resampled", "shuffle_buffer", "augment"),
}
_ENV_REF = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="ALBEF pretraining with DeepSpeed ZeRO")
    parser.add_argument("--config", required=True, help="run config YAML (e.g. configs/pretrain_4m.yaml)")
    parser.add_argument("--deepspeed_config", required=True, help="DeepSpeed JSON (e.g. ds_configs/zero2.json)")
    parser.add_argument("--output-dir", help="run folder (default: train.output_dir of the config)")
    parser.add_argument("--resume", help="'auto' (newest complete checkpoint of the run folder, if any) or a path")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimiser steps (schedule unchanged)")
    parser.add_argument("--stop-file", help="a file whose appearance asks for checkpoint-and-exit "
                                            "(default: <output-dir>/stop_requested)")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    return parser.parse_args(argv)


def check_run_config(cfg: dict) -> None:
    """Refuse a config that lacks a setting the trainer reads, naming it."""
    for section, keys in REQUIRED.items():
        if not isinstance(cfg.get(section), dict):
            raise ValueError(f"config has no `{section}:` section")
        missing = [f"{section}.{k}" for k in keys if k not in cfg[section]]
        if missing:
            raise ValueError(f"config lacks {', '.join(missing)} (see configs/pretrain_base.yaml)")
    for key in ("log_every", "checkpoint_every", "epochs", "eval_every"):
        value = cfg["train"][key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"train.{key}={value!r} must be a positive integer")
    if not cfg["data"]["shards"]:
        raise ValueError("data.shards is not set: give the training shard spec "
                         "(e.g. data.shards=/data/cc3m/{00000..00331}.tar)")


def expand_env(text: str, env=os.environ) -> str:
    """Replace `${VAR}` and `${VAR:-default}` in a setting; an unset VAR without default is an error."""
    def sub(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is None:
            raise ValueError(f"setting {text!r} refers to ${{{name}}}, which is not set")
        return default

    return _ENV_REF.sub(sub, text)


def vectorise_scalar_params(module: torch.nn.Module) -> list[str]:
    """Give 0-d parameters (ALBEF's `temp`) shape [1] for the life of the engine; returns their names.

    deepspeed 0.19.8 broadcasts parameters at start-up with `p.data.view(torch.uint8)`
    (`DeepSpeedEngine._broadcast_model`, every ZeRO stage), which fails on a 0-d
    tensor, and its ZeRO optimisers remember the shapes they saw then. A [1]
    tensor broadcasts against the similarity matrices exactly like the scalar;
    the export puts the released layout's 0-d shape back (`model/export.py`).
    """
    names = []
    for name, p in module.named_parameters():
        if p.dim() == 0:
            p.data = p.data.view(1)
            names.append(name)
    return names


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def param_groups(params, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases and other 1-D tensors, as the reference.

    The reference exempts exactly the 1-D parameters, so the 0-D temperature is decayed.
    """
    decay, no_decay = [], []
    for p in params:
        (no_decay if p.ndim == 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def clamp_temperature(module: torch.nn.Module, low: float, high: float) -> None:
    """Keep the optimiser's fp32 master copy of `temp` (and the module's) inside [low, high].

    The reference clamps `temp` in place at every forward, so the clamped value is
    what the next update starts from. Under ZeRO-1/2/3 the optimiser updates its
    own fp32 master copy and writes it back after each step; the forward's clamp
    never reaches that copy (under ZeRO-3 it only touches a gathered, discarded
    copy), which could drift past the bound. Called after every optimiser step,
    on every rank (collective under ZeRO-1/2). (DeepSpeed 0.19.8's full-parameter
    setter fails for a ZeRO-3 parameter smaller than the world size, hence the
    local partition API there.)
    """
    temp = module.temp
    if hasattr(temp, "ds_id"):  # ZeRO-3: each rank clamps its partition (padding included, unused)
        safe_set_local_fp32_param(temp, safe_get_local_fp32_param(temp).clamp(low, high))
        temp.ds_tensor.clamp_(low, high)
        return
    master = safe_get_full_fp32_param(temp)  # None without a ZeRO optimiser: the forward's clamp persists
    if master is None:
        return
    clamped = master.clamp(low, high)
    if not torch.equal(clamped, master):
        safe_set_full_fp32_param(temp, clamped)
        temp.clamp_(low, high)


class Trainer:
    """One pretraining run: built collectively on every rank, then `train()`."""

    @property
    def epoch(self) -> int:
        """The epoch the data loader is in (it owns the data position)."""
        return self.loader.epoch

    def __init__(self, args: argparse.Namespace):
        apply_slurm_env()
        self.args = args
        self.cfg = cfg = load_config(args.config, args.overrides)
        check_run_config(cfg)
        shards = cfg["data"]["shards"]
        cfg["data"]["shards"] = [expand_env(s) for s in shards] if isinstance(shards, list) else expand_env(shards)
        tcfg = cfg["train"]
        self.out_dir = Path(args.output_dir or tcfg["output_dir"])
        # Installed first: a stop request that arrives during start-up is served after the first step.
        self.stop = StopRequest(Path(args.stop_file) if args.stop_file else self.out_dir / "stop_requested",
                                tuple(tcfg["stop_signals"]))
        self.rank, self.world, self.device = init_engine_process_group(args.local_rank, tcfg["dist_timeout_s"])
        self.use_cuda = self.device.type == "cuda"

        self.plan = BatchPlan(micro_batch=tcfg["batch_size_per_rank"],
                              grad_accum=tcfg["gradient_accumulation_steps"],
                              world_size=self.world, queue_size=cfg["model"]["queue_size"])
        self.ds_cfg = resolve_ds_config(load_ds_config(args.deepspeed_config), self.plan,
                                        source=str(args.deepspeed_config))
        self.zero_stage = zero_stage(self.ds_cfg)

        # Same seed on every rank for the model (identical init), then per rank for the data and dropout.
        seed_everything(tcfg["seed"])
        tokenizer, model = self._build_model()
        seed_everything(tcfg["seed"] + self.rank)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(tcfg["seed"] + self.rank)

        optimizer = torch.optim.AdamW(param_groups(model.trainable_parameters(), tcfg["weight_decay"]),
                                      lr=tcfg["lr"], betas=tuple(tcfg["betas"]), eps=tcfg["eps"])
        self.tokenizer = tokenizer
        self.loader = self._build_loader(tokenizer)
        self.eval_set = self._build_eval_set()
        self.batches_per_epoch = self.loader.batches_per_epoch
        if self.batches_per_epoch < self.plan.grad_accum:
            raise ValueError(
                f"an epoch has {self.batches_per_epoch} batches per rank, fewer than "
                f"train.gradient_accumulation_steps {self.plan.grad_accum}: not one optimiser step per epoch")
        schedule_steps = tcfg["epochs"] * self.batches_per_epoch // self.plan.grad_accum
        self.total_steps = schedule_steps if args.max_steps is None else min(schedule_steps, args.max_steps)
        self.schedule = LRSchedule(lr=tcfg["lr"], warmup_lr=tcfg["warmup_lr"], min_lr=tcfg["min_lr"],
                                   warmup_steps=tcfg["warmup_steps"], total_steps=schedule_steps)
        lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.schedule.factor)
        self.scalar_params = vectorise_scalar_params(model)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                    lr_scheduler=lr_scheduler, config=self.ds_cfg)
        self.module = self.engine.module
        self.module.sync_buffers()

        self.ckpt = CheckpointManager(self.out_dir / "checkpoints", tcfg["keep_checkpoints"],
                                      self.rank, self.world)
        self.step = self.micro_step = 0
        self.resumed_from = self._maybe_resume()
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out_dir / "config.yaml")
            (self.out_dir / "ds_config.json").write_text(json.dumps(self.ds_cfg, indent=2) + "\n")
        dist.barrier()
        log_dir = self.out_dir / "logs"
        self.records = StepRecords(log_dir, self.rank)
        self.metrics = MetricsLog(log_dir, self.step if self.resumed_from else None) if self.rank == 0 else None
        self.throughput = Throughput()

    def _build_model(self):
        tokenizer = load_tokenizer(self.cfg["model"]["text"]["tokenizer"])
        self.cfg["model"]["text"].update(text_settings_from_tokenizer(tokenizer))
        model = ALBEF(self.cfg["model"], global_batch_size=self.plan.enqueue_batch)
        return tokenizer, model

    def _build_loader(self, tokenizer):
        dcfg, tcfg = self.cfg["data"], self.cfg["train"]
        return ShardLoader(dcfg["shards"], tokenizer, batch_size=self.plan.micro_batch, rank=self.rank,
                           world_size=self.world, num_workers=dcfg["num_workers"], seed=tcfg["seed"],
                           train=True, image_res=self.cfg["model"]["vision"]["image_res"],
                           max_tokens=tcfg["max_tokens"], resampled=dcfg["resampled"],
                           shuffle_buffer=dcfg["shuffle_buffer"], augment=dcfg["augment"],
                           pin_memory=self.use_cuda)

    def _build_eval_set(self) -> RetrievalEvalDataset | None:
        tcfg = self.cfg["train"]
        if not tcfg["eval_annotation"]:
            return None
        if not tcfg["eval_image_root"]:
            raise ValueError("train.eval_annotation is set but train.eval_image_root is not")
        transform = ImageTransform(self.cfg["model"]["vision"]["image_res"], train=False)
        return RetrievalEvalDataset(expand_env(tcfg["eval_annotation"]), expand_env(tcfg["eval_image_root"]),
                                    transform)

    def _evaluate(self) -> None:
        """Zero-shot ITC-only retrieval on the held-out set (collective: every rank computes it)."""
        metrics = evaluate_itc(self.module, self.eval_set, self.tokenizer,
                               max_tokens=self.cfg["train"]["eval_max_tokens"], device=self.device)
        self.records.write({"event": "eval", "step": self.step, "rank": self.rank, **metrics})
        if self.rank == 0:
            self.metrics.write_eval(self.step, metrics)
            print(f"[train] eval step {self.step}: TR@1/5/10 {metrics['txt_r1']:.1f}/{metrics['txt_r5']:.1f}/"
                  f"{metrics['txt_r10']:.1f} IR@1/5/10 {metrics['img_r1']:.1f}/{metrics['img_r5']:.1f}/"
                  f"{metrics['img_r10']:.1f} r_mean {metrics['r_mean']:.1f} ({metrics['n_images']} images, "
                  f"{metrics['n_texts']} texts)", flush=True)

    def _maybe_resume(self) -> str | None:
        path = self.ckpt.resolve(self.args.resume)
        if self.args.resume is None and complete_tags(self.ckpt.dir):
            raise ValueError(f"{self.ckpt.dir} already holds checkpoints: pass --resume auto to continue that run, "
                             f"or choose another --output-dir to start a new one")
        if path is None:
            return None
        extra, rank_state, loader_state = self.ckpt.load(self.engine, path)
        if extra["global_batch"] != self.plan.global_batch:
            raise ValueError(f"checkpoint {path} was trained with global batch {extra['global_batch']}, "
                             f"this run has {self.plan.global_batch}")
        self.step, self.micro_step = extra["step"], extra["micro_step"]
        for name, value in extra["queues"].items():
            getattr(self.module.queue, name).copy_(value)
        restore_rng(rank_state, self.generator)
        self.loader.load_state_dict(loader_state)
        return str(path)

    def _save(self) -> None:
        queues = {name: buf.detach().cpu().clone() for name, buf in self.module.queue.named_buffers()}
        extra = {
            "step": self.step, "micro_step": self.micro_step, "epoch": self.epoch,
            "alpha": alpha_at(self.micro_step, self.batches_per_epoch, self.cfg["train"]["alpha"]),
            "queues": queues, "global_batch": self.plan.global_batch, "config": self.cfg,
        }
        self.ckpt.save(self.engine, self.step, extra, capture_rng(self.generator), self.loader.state_dict())

    def _start_record(self) -> dict:
        mparams = momentum_params(self.module)
        return {
            "event": "start", "rank": self.rank, "pid": os.getpid(), "world_size": self.world,
            "zero_stage": self.zero_stage, "step": self.step, "micro_step": self.micro_step, "epoch": self.epoch,
            "total_steps": self.total_steps, "batches_per_epoch": self.batches_per_epoch,
            "global_batch": self.plan.global_batch, "resumed_from": self.resumed_from,
            "queue_checksum": queue_checksum(self.module), "momentum_checksum": momentum_checksum(self.module),
            "queue_ptr": int(self.module.queue.queue_ptr), "loader_state": self.loader.state_dict(),
            "momentum_partitioned": any(hasattr(p, "ds_tensor") for p in mparams), **self._dtypes(),
        }

    def _dtypes(self) -> dict:
        """Storage dtypes of the momentum model (its partitions) and the queues: fp32 unless cast."""
        return {"momentum_dtypes": sorted({str(local_tensor(p).dtype) for p in momentum_params(self.module)}),
                "queue_dtypes": sorted({str(getattr(self.module.queue, n).dtype) for n in QUEUE_BUFFERS})}

    def train(self) -> int:
        tcfg = self.cfg["train"]
        accum = self.plan.grad_accum
        self.records.write(self._start_record())
        if self.rank == 0:
            print(f"[train] world {self.world} x micro batch {self.plan.micro_batch} x accum {accum} = global "
                  f"batch {self.plan.global_batch}; {self.batches_per_epoch} batches/rank/epoch; "
                  f"ZeRO-{self.zero_stage}; steps {self.step} -> {self.total_steps}"
                  + (f"; resumed from {self.resumed_from}" if self.resumed_from else ""), flush=True)
        self.engine.train()
        batches = iter(self.loader)
        reset_peak_memory(self.device)
        self.throughput.reset()
        window: dict[str, float] = {}
        step_sums: dict[str, float] = {}
        fingerprint, image_sum, wait_s = 0, 0.0, 0.0
        stopped = False
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            try:
                # The DataLoader draws its base seed from torch's global generator when an epoch's
                # iteration starts; isolating it keeps dropout's random stream independent of where
                # a run (re)started its data iterator, so a resumed run repeats an uninterrupted one.
                with torch.random.fork_rng(devices=[]):
                    batch = next(batches)
            except StopIteration:  # epoch done: the loader's next iteration is the next epoch
                batches = iter(self.loader)
                continue
            wait_s += time.perf_counter() - t0
            self.throughput.add_wait(time.perf_counter() - t0)
            image = batch["image"].to(self.device, non_blocking=True)
            input_ids = batch["input_ids"].to(self.device, non_blocking=True)
            attention_mask = batch["attention_mask"].to(self.device, non_blocking=True)
            alpha = alpha_at(self.micro_step, self.batches_per_epoch, tcfg["alpha"])
            out = self.engine(image, input_ids, attention_mask, alpha=alpha, generator=self.generator)
            self.engine.backward(out["loss"])
            lr = self.engine.get_lr()[0]
            self.engine.step()
            self.micro_step += 1
            fingerprint += batch_fingerprint(input_ids)
            image_sum += float(image.sum(dtype=torch.float64))
            for key in LOSS_AND_METRIC_KEYS:
                if key in out:
                    step_sums[key] = step_sums.get(key, 0.0) + float(out[key].detach()) / accum
            if self.micro_step % accum:
                continue
            clamp_temperature(self.module, self.cfg["model"]["temp_min"], self.cfg["model"]["temp_max"])
            self.step += 1
            self.throughput.add_step(self.plan.global_batch)
            self.records.write({
                "step": self.step, "micro_step": self.micro_step, "epoch": self.epoch, "rank": self.rank,
                "time": time.time(), "lr": lr, "alpha": alpha, **step_sums, "batch_fingerprint": fingerprint,
                "image_checksum": image_sum,
                "queue_checksum": queue_checksum(self.module), "queue_ptr": int(self.module.queue.queue_ptr),
                "momentum_checksum": momentum_checksum(self.module), **self._dtypes(),
                "mem_mb": memory_mb(self.device), "peak_mem_mb": peak_memory_mb(self.device),
                "data_wait_s": wait_s,
            })
            for key, value in step_sums.items():
                window[key] = window.get(key, 0.0) + value
            window["n"] = window.get("n", 0.0) + 1
            window.update(lr=lr, alpha=alpha)
            step_sums, fingerprint, image_sum, wait_s = {}, 0, 0.0, 0.0
            last = self.step == self.total_steps
            if self.step % tcfg["log_every"] == 0 or last:
                self._log(window)
                window = {}
            if self.eval_set is not None and (self.step % tcfg["eval_every"] == 0 or last):
                self._evaluate()
            saved = False
            if self.step % tcfg["checkpoint_every"] == 0 or last:
                self._save()
                saved = True
            if self.stop.agreed(self.device):
                if not saved:
                    self._save()
                if self.rank == 0:
                    self.stop.clear()
                    print(f"[train] stop requested: checkpoint at step {self.step} written, exiting", flush=True)
                stopped = True
                break
        if not stopped:
            self._finish()
        self.records.close()
        if self.metrics is not None:
            self.metrics.close()
        return 0

    def _log(self, window: dict[str, float]) -> None:
        n = window.pop("n")
        lr, alpha = window.pop("lr"), window.pop("alpha")
        keys = sorted(window)
        means = torch.tensor([window[k] / n for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(means)
        means /= self.world
        scalars = {**dict(zip(keys, means.tolist())), **self.throughput.summary(),
                   "lr": lr, "alpha": alpha, "epoch": self.epoch, "peak_mem_mb": peak_memory_mb(self.device)}
        self.throughput.reset()
        if self.rank == 0:
            print("[train] " + progress_line(self.step, self.total_steps, self.epoch, scalars), flush=True)
            self.metrics.write(self.step, scalars)

    def _finish(self) -> None:
        path = export_engine(self.engine, self.cfg, self.step, self.epoch, self.out_dir / "export", self.zero_stage,
                             self.scalar_params)
        if self.rank == 0:
            if self.metrics.csv_path.is_file():
                plot_run(self.out_dir)
            print(f"[train] done at step {self.step}; export {path}; plots in {self.out_dir / 'plots'}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        trainer = Trainer(args)
        return trainer.train()
    except (ValueError, FileNotFoundError) as err:
        print(f"[train] rank {os.environ.get('RANK', '0')}: error: {err}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
