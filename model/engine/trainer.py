"""The one DeepSpeed training loop, shared by every task recipe.

Per micro-step: the recipe's `step` gives the loss terms; the engine weighs and
sums them (`train.loss_weights`, 1.0 each by default = the paper's unweighted
sum), runs backward and DeepSpeed's step (which applies the optimiser at the
accumulation boundary). Losses and metrics stay device tensors, summed on the
device; they are reduced over ranks and read on the host only at `log_every`
steps (nothing else in the loop waits for the device unless
`train.debug_records` asks for per-step records).

Per optimiser step: `recipe.after_step` (e.g. the temperature clamp); every
`log_every` steps the progress line and metrics (`train.report_to`: CSV, TensorBoard, W&B); the ranks
agree on stop requests (signals every step, the stop file every `stop_check_every`);
evaluation when the recipe asks for it (every N steps or at epoch ends), with the
best value of `recipe.select_metric` picking the exported model; checkpoints
every `checkpoint_every` steps, at the end and on a stop request. At the end:
the export (`export/albef.pth` unless an evaluation chose another) and plots.

Run folder: config.yaml (as written, `${VAR}` unexpanded), ds_config.json,
checkpoints/, logs/ (train.log: rank 0's output outside Slurm, metrics.csv, eval.csv, epochs.jsonl, tb/,
wandb/, records_rank{R}.jsonl
with `train.debug_records`), plots/, export/.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import time
from pathlib import Path

import deepspeed
import numpy as np
import torch
import torch.distributed as dist

from model.albef import text_settings_from_tokenizer
from model.losses import total_loss
from model.engine.checkpointing import CheckpointManager, capture_rng, complete_tags, restore_rng
from model.engine.config import RunConfig, save_config
from model.engine.dist_env import apply_slurm_env, init_engine_process_group
from model.engine.ds_config import BatchPlan, autocast_dtype, load_ds_config, require_cuda, resolve_ds_config, \
    zero_stage
from model.engine.export import export_engine
from model.engine.health import collapse_message, eval_problems, window_problems
from model.engine.plot import plot_run
from model.engine.preemption import StopRequest
from model.engine.progress import MetricsLog, StepRecords, Throughput, peak_memory_mb, progress_line, \
    reset_peak_memory
from model.engine.records import debug_record, start_record
from model.engine.recipe import Recipe, RunEnv
from model.engine.tracking import TRAIN_LOG, TeeOutput, rank_devices, tee_wanted
from model.engine.schedule import LRSchedule, alpha_at
from pipeline.tokenize import load_tokenizer


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


def vectorise_scalar_params(module: torch.nn.Module) -> list[str]:
    """Give 0-d parameters (ALBEF's `temp`) shape [1] for the life of the engine; returns their names.

    deepspeed 0.19.8 broadcasts parameters at start-up with `p.data.view(torch.uint8)`
    (`DeepSpeedEngine._broadcast_model`, every ZeRO stage), which fails on a 0-d
    tensor, and its ZeRO optimisers remember the shapes they saw then. A [1]
    tensor broadcasts against the similarity matrices exactly like the scalar;
    the export puts the released layout's 0-d shape back (`model/engine/export.py`).
    """
    names = []
    for name, p in module.named_parameters():
        if p.dim() == 0:
            p.data = p.data.view(1)
            names.append(name)
    return names


def loss_weights(recipe: type[Recipe], weights: dict[str, float]) -> dict[str, float]:
    """`loss_<name>` -> weight for every loss the recipe produces; unknown names are refused."""
    names = [n.removeprefix("loss_") for n in recipe.loss_names]
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ValueError(f"train.loss_weights: {', '.join(unknown)} is not a loss of task {recipe.name}; "
                         f"its losses: {', '.join(names)}")
    return {f"loss_{n}": float(weights.get(n, 1.0)) for n in names}


def flatten_metrics(metrics: dict) -> dict[str, float]:
    """{split: {metric: v}} or {"split/metric": v} -> {"split/metric": v}."""
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update({f"{key}/{k}": v for k, v in value.items() if isinstance(v, (int, float))})
        elif isinstance(value, (int, float)):
            flat[key] = value
    return flat


class CollapseError(RuntimeError):
    """The health check found a collapse and `train.stop_on_collapse` is set."""


class Trainer:
    """One training run of any task: built collectively on every rank, then `train()`."""

    def __init__(self, args: argparse.Namespace, recipe_cls: type[Recipe], run: RunConfig):
        apply_slurm_env()
        self.args, self.run = args, run
        t = run.train
        self.weights = loss_weights(recipe_cls, t.loss_weights)
        self.out_dir = Path(args.output_dir or t.output_dir)
        # Installed first: a stop request that arrives during start-up is served after the first step.
        self.stop = StopRequest(Path(args.stop_file) if args.stop_file else self.out_dir / "stop_requested",
                                tuple(t.stop_signals))
        require_cuda(load_ds_config(args.deepspeed_config), str(args.deepspeed_config), torch.cuda.is_available())
        self.rank, self.world, self.device = init_engine_process_group(args.local_rank, t.dist_timeout_s)
        if self.device.type == "cuda":   # TF32 for the fp32 matmuls outside autocast (similarities, EMA-free parts)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.plan = BatchPlan(micro_batch=t.batch_size_per_rank, grad_accum=t.gradient_accumulation_steps,
                              world_size=self.world,
                              queue_size=run.model["queue_size"] if recipe_cls.uses_queue else None)
        self.ds_cfg = resolve_ds_config(load_ds_config(args.deepspeed_config), self.plan,
                                        source=str(args.deepspeed_config))
        self.zero_stage = zero_stage(self.ds_cfg)
        self.recipe = recipe = recipe_cls(run, RunEnv(self.rank, self.world, self.device,
                                                      self.plan.global_batch, self.plan.enqueue_batch))
        recipe.out_dir = self.out_dir

        # Same seed on every rank for the model (identical init), then per rank for the data and dropout.
        seed_everything(t.seed)
        self.tokenizer = load_tokenizer(run.model["text"]["tokenizer"])
        run.model["text"].update(text_settings_from_tokenizer(self.tokenizer))
        model = recipe.build_model(self.tokenizer, args.checkpoint or t.init_checkpoint)
        seed_everything(t.seed + self.rank)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(t.seed + self.rank)

        optimizer = self._optimizer(model)
        self.loader = recipe.train_loader(self.tokenizer)
        self.batches_per_epoch = self.loader.batches_per_epoch
        if self.batches_per_epoch < self.plan.grad_accum:
            raise ValueError(
                f"an epoch has {self.batches_per_epoch} batches per rank, fewer than "
                f"train.gradient_accumulation_steps {self.plan.grad_accum}: not one optimiser step per epoch")
        schedule_steps = t.epochs * self.batches_per_epoch // self.plan.grad_accum
        self.total_steps = schedule_steps if args.max_steps is None else min(schedule_steps, args.max_steps)
        self.schedule = LRSchedule(lr=t.lr, warmup_lr=t.warmup_lr, min_lr=t.min_lr,
                                   warmup_steps=t.warmup_steps, total_steps=schedule_steps)
        lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.schedule.factor)
        self.scalar_params = vectorise_scalar_params(model)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                    lr_scheduler=lr_scheduler, config=self.ds_cfg)
        self.module = self.engine.module
        if hasattr(self.module, "sync_buffers"):
            self.module.sync_buffers()

        self.ckpt = CheckpointManager(self.out_dir / "checkpoints", t.keep_checkpoints, self.rank, self.world)
        self.step = self.micro_step = 0
        self.best: float | None = None
        self.resumed_from = self._maybe_resume()
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(run.raw, self.out_dir / "config.yaml")
            (self.out_dir / "ds_config.json").write_text(json.dumps(self.ds_cfg, indent=2) + "\n")
        dist.barrier()
        log_dir = self.out_dir / "logs"
        self.records = StepRecords(log_dir, self.rank) if t.debug_records else None
        self.metrics = MetricsLog(log_dir, self.step if self.resumed_from else None, t.report_to,
                                  run_name=self.out_dir.name, config=run.raw) if self.rank == 0 else None
        self.throughput = Throughput()
        self._collapse_since: int | None = None   # step of the first of the current run of collapse findings

    def _optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        t = self.run.train
        fused = {"fused": True} if self.device.type == "cuda" else {}
        return torch.optim.AdamW(param_groups(model.trainable_parameters(), t.weight_decay),
                                 lr=t.lr, betas=tuple(t.betas), eps=t.eps, **fused)

    @property
    def epoch(self) -> int:
        """The epoch the data loader is in (it owns the data position)."""
        return self.loader.epoch

    def _alpha(self) -> float:
        """Distillation weight of the next micro-step: ramped over the first epoch, or constant."""
        t = self.run.train
        return alpha_at(self.micro_step, self.batches_per_epoch, t.alpha) if t.alpha_warmup else t.alpha

    # ------------------------------------------------------------------ checkpoints

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
        self.best = extra.get("best_metric")
        self.recipe.load_extra_state(self.module, extra)
        restore_rng(rank_state, self.generator)
        self.loader.load_state_dict(loader_state)
        return str(path)

    def _save(self) -> None:
        extra = {
            "step": self.step, "micro_step": self.micro_step, "epoch": self.epoch,
            "alpha": self._alpha(),
            "global_batch": self.plan.global_batch, "config": self.run.raw, "task": self.run.task,
            "best_metric": self.best, **self.recipe.extra_state(self.module),
        }
        self.ckpt.save(self.engine, self.step, extra, capture_rng(self.generator), self.loader.state_dict())

    def _export(self) -> Path | None:
        return export_engine(self.engine, self.recipe.export_state_dict, self.run.raw, self.step, self.epoch,
                             self.out_dir / "export", self.zero_stage, self.scalar_params)

    # ------------------------------------------------------------------ the loop

    def train(self) -> int:
        t = self.run.train
        accum = self.plan.grad_accum
        if self.records is not None:
            self.records.write(start_record(self))
        devices = self._rank_devices()
        if self.rank == 0:
            report = self.recipe.load_report()
            if report:
                print(f"[train] {report}", flush=True)
            dtype = autocast_dtype(self.ds_cfg)
            print(f"[train] task {self.run.task}; ranks {devices}; world {self.world} x micro batch "
                  f"{self.plan.micro_batch} x accum {accum} = global batch {self.plan.global_batch}; "
                  f"{self.batches_per_epoch} batches/rank/epoch; ZeRO-{self.zero_stage} "
                  f"({self.args.deepspeed_config}); precision {dtype + ' autocast' if dtype else 'fp32'}; "
                  f"steps {self.step} -> {self.total_steps}"
                  + (f"; resumed from {self.resumed_from}" if self.resumed_from else ""), flush=True)
        self.engine.train()
        batches = iter(self.loader)
        reset_peak_memory(self.device)
        self.throughput.reset()
        window: dict[str, torch.Tensor] = {}     # summed over the log window's micro-steps (device)
        epoch_sums: dict[str, torch.Tensor] = {}  # summed over the epoch's micro-steps (device)
        step_sums: dict[str, torch.Tensor] = {}   # this optimiser step, for debug records
        window_micro = epoch_micro = 0
        debug = {"fingerprint": 0, "image_sum": 0.0, "wait_s": 0.0}
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
            wait = time.perf_counter() - t0
            self.throughput.add_wait(wait)
            alpha = self._alpha()
            out = self.recipe.step(self.engine, batch, alpha, self.generator)
            loss = total_loss(out, self.weights)
            self.engine.backward(loss)
            lr = self.engine.get_lr()[0]
            self.engine.step()
            self.micro_step += 1
            scalars = {"loss": loss.detach(), **{k: v.detach() for k, v in out.items()}}
            for sums in (window, epoch_sums):
                for key, value in scalars.items():
                    sums[key] = sums[key] + value if key in sums else value.clone()
            window_micro += 1
            epoch_micro += 1
            if self.records is not None:
                for key, value in scalars.items():
                    step_sums[key] = step_sums.get(key, 0.0) + float(value) / accum
                debug["wait_s"] += wait
                debug_record_batch(debug, batch)
            epoch_ended = self.micro_step % self.batches_per_epoch == 0
            if self.micro_step % accum:
                if epoch_ended:
                    self._epoch_end(epoch_sums, epoch_micro, boundary=False)
                    epoch_sums, epoch_micro = {}, 0
                continue
            self.recipe.after_step(self.module)
            self.step += 1
            self.throughput.add_step(self.plan.global_batch)
            if self.records is not None:
                self.records.write(debug_record(self, lr, alpha, step_sums, debug))
                step_sums, debug = {}, {"fingerprint": 0, "image_sum": 0.0, "wait_s": 0.0}
            last = self.step == self.total_steps
            if self.step % t.log_every == 0 or last:
                self._log(window, window_micro, lr, alpha)
                window, window_micro = {}, 0
            if epoch_ended or last:
                self._epoch_end(epoch_sums, epoch_micro, boundary=True, last=last)
                epoch_sums, epoch_micro = {}, 0
            elif self.recipe.should_evaluate(self.step, epoch_ended=False, last=False):
                self._evaluate()
            saved = False
            if self.step % t.checkpoint_every == 0 or last:
                self._save()
                saved = True
            # Signals (SIGTERM: Slurm's KillWait runs) are agreed at every step, the stop file every
            # stop_check_every steps (model/engine/preemption.py).
            if self.stop.at_step_boundary(check_file=self.step % t.stop_check_every == 0 or saved, final=last):
                if not saved:
                    self._save()
                if self.rank == 0:
                    self.stop.clear()
                    print(f"[train] stop requested: checkpoint at step {self.step} written, exiting", flush=True)
                stopped = True
                break
        if not stopped:
            self._finish()
        self._write_loader_stats()
        if self.records is not None:
            self.records.close()
        if self.metrics is not None:
            self.metrics.close()
        return 0

    # ------------------------------------------------------------------ logging, evaluation, end

    def _reduce_means(self, sums: dict[str, torch.Tensor], count: int) -> dict[str, float]:
        """Mean over micro-steps and ranks: one all-reduce and one device-to-host copy."""
        keys = sorted(sums)
        if not keys:
            return {}
        means = torch.stack([sums[k].float().reshape(()) for k in keys]).double() / max(count, 1)
        dist.all_reduce(means)
        return dict(zip(keys, (means / self.world).tolist()))

    def _log(self, window: dict[str, torch.Tensor], count: int, lr: float, alpha: float) -> None:
        bad = self._bad_samples()
        scalars = {**self._reduce_means(window, count), **self.throughput.summary(),
                   "lr": lr, "alpha": alpha, "epoch": self.epoch, "peak_mem_mb": peak_memory_mb(self.device),
                   "bad_samples": float(sum(bad.values()))}
        self.throughput.reset()
        problems = window_problems(scalars, self.recipe.itc_chance()) if self.step > self.run.train.warmup_steps \
            else []
        scalars["collapse"] = float(bool(problems))
        if self.rank == 0:
            print("[train] " + progress_line(self.step, self.total_steps, self.epoch, scalars), flush=True)
            self.metrics.write(self.step, scalars, {f"bad/{reason}": n for reason, n in bad.items()})
        self._on_problems(problems)

    def _on_problems(self, problems: list[str]) -> None:
        """Warn about a collapse; with `train.stop_on_collapse`, checkpoint and stop once the findings have
        lasted `train.collapse_patience_steps` without a healthy check between (same verdict on every rank)."""
        if not problems:
            self._collapse_since = None
            return
        if self._collapse_since is None:
            self._collapse_since = self.step
        lasted = self.step - self._collapse_since
        message = collapse_message(self.step, problems)
        if self.rank == 0:
            print(f"[train] WARNING: {message} (found for {lasted} steps)", flush=True)
        if self.run.train.stop_on_collapse and lasted >= self.run.train.collapse_patience_steps:
            self._save()
            raise CollapseError(message + f" (for {lasted} steps >= train.collapse_patience_steps; "
                                f"train.stop_on_collapse: checkpoint written, run stopped)")

    def _rank_devices(self) -> str:
        """Every rank's device and the backend, e.g. `cuda:0..7 nccl` (collective)."""
        entries = [None] * self.world
        dist.all_gather_object(entries, (socket.gethostname(), str(self.device)))
        return rank_devices(entries, dist.get_backend())

    def _bad_samples(self) -> dict[str, int]:
        """Distinct bad samples of this epoch by reason, summed over ranks (logging steps only)."""
        mine = self.loader.bad_samples()
        gathered = [None] * self.world
        dist.all_gather_object(gathered, mine)
        total: dict[str, int] = {}
        for counts in gathered:
            for reason, n in counts.items():
                total[reason] = total.get(reason, 0) + int(n)
        return total

    def _epoch_end(self, sums: dict[str, torch.Tensor], count: int, boundary: bool, last: bool = False) -> None:
        """Epoch summary (logs/epochs.jsonl) and the epoch-end evaluation the recipe asks for."""
        epoch = (self.micro_step - 1) // self.batches_per_epoch
        evaluate = self.recipe.should_evaluate(self.step, epoch_ended=True, last=last)
        if not (evaluate or self.recipe.evaluate_every_epoch):
            return
        train = self._reduce_means(sums, count)
        failures = self._loader_failures()
        train["image_load_failures"] = failures
        metrics, improved = self._evaluate(epoch) if evaluate else ({}, False)
        if self.rank == 0:
            with (self.out_dir / "logs" / "epochs.jsonl").open("a") as f:
                f.write(json.dumps({"epoch": epoch, "step": self.step, "train": train, **metrics,
                                    "best": improved}) + "\n")

    def _loader_failures(self) -> int:
        counts = torch.tensor([float(sum(self.loader.bad_samples().values()))], dtype=torch.float64,
                              device=self.device)
        dist.all_reduce(counts)
        return int(counts.item())

    def _evaluate(self, epoch: int | None = None) -> tuple[dict, bool]:
        """Collective evaluation; exports the model when the selection metric improved."""
        epoch = self.epoch if epoch is None else epoch
        metrics = self.recipe.evaluate(self.module, self.tokenizer, self.step, epoch)
        self.engine.train()
        flat = flatten_metrics(metrics)
        problems = eval_problems(flat)
        flat["collapse"] = float(bool(problems))
        if self.records is not None:
            self.records.write({"event": "eval", "step": self.step, "rank": self.rank, **flat})
        if self.rank == 0:
            self.metrics.write_eval(self.step, flat)
        self._on_problems(problems)
        improved = False
        if self.recipe.select_metric is not None:
            score = select_value(flat, self.recipe.select_metric)
            improved = score is not None and (self.best is None or score > self.best)
            if improved:
                self.best = score
                self._export()
                if self.rank == 0:
                    self.recipe.save_best(self.out_dir / "export")
        return metrics, improved

    def _write_loader_stats(self) -> None:
        path = self.out_dir / "logs" / f"loader_stats_rank{self.rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.loader.stats(), default=str) + "\n")

    def _finish(self) -> None:
        path = None
        if self.recipe.select_metric is None:
            path = self._export()
        elif self.best is None:   # never evaluated (e.g. --max-steps before the first epoch end)
            path = self._export()
        if self.rank == 0:
            if self.metrics.csv_path.is_file():
                plot_run(self.out_dir)
            where = path or self.out_dir / "export"
            best = f"; best {self.recipe.select_metric} {self.best:.2f}" if self.best is not None else ""
            print(f"[train] done at step {self.step}{best}; export {where}; plots in {self.out_dir / 'plots'}",
                  flush=True)


def select_value(flat: dict[str, float], name: str) -> float | None:
    """`split/metric`; when that split was not evaluated, the same metric of the first split that was."""
    if name in flat:
        return flat[name]
    metric = name.split("/", 1)[-1]
    for key, value in flat.items():
        if key.split("/", 1)[-1] == metric:
            return value
    return None


def debug_record_batch(debug: dict, batch: dict) -> None:
    """Batch fingerprints for the debug records (host-side sums; only with `train.debug_records`)."""
    from model.engine.records import batch_fingerprint
    if "input_ids" in batch:
        debug["fingerprint"] += batch_fingerprint(batch["input_ids"])
    pixels = batch.get("image", batch.get("image_crops"))   # image_crops: data.augment.on_device
    if pixels is not None:
        debug["image_sum"] += float(pixels.sum(dtype=torch.float64))


def run_training(args: argparse.Namespace, recipe_cls: type[Recipe], run: RunConfig) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    apply_slurm_env()
    tee = None
    if os.environ.get("RANK", "0") == "0" and tee_wanted():   # rank 0's output also in logs/train.log
        tee = TeeOutput(Path(args.output_dir or run.train.output_dir) / "logs" / TRAIN_LOG)
    try:
        return Trainer(args, recipe_cls, run).train()
    except BaseException as err:
        if tee is not None:
            tee.note_exception(err)
        raise
    finally:
        if tee is not None:
            tee.close()
