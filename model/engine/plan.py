"""`model/train.py --dry-run`: everything a run checks before it starts, and its plan, without an engine."""
from __future__ import annotations

import argparse
import os

import torch

from model.engine.config import RunConfig
from model.engine.dist_env import slurm_rendezvous
from model.engine.ds_config import BatchPlan, autocast_dtype, load_ds_config, resolve_ds_config, zero_stage
from model.engine.recipe import Recipe, RunEnv
from model.engine.trainer import loss_weights


def planned_world_size(args: argparse.Namespace) -> int:
    if args.world_size:
        return args.world_size
    env = dict(os.environ)
    if "WORLD_SIZE" not in env and "SLURM_NTASKS" in env:
        env.update(slurm_rendezvous(env))
    return int(env.get("WORLD_SIZE", "1"))


def dry_run(args: argparse.Namespace, recipe_cls: type[Recipe], run: RunConfig) -> int:
    t = run.train
    loss_weights(recipe_cls, t.loss_weights)
    world = planned_world_size(args)
    plan = BatchPlan(micro_batch=t.batch_size_per_rank, grad_accum=t.gradient_accumulation_steps, world_size=world,
                     queue_size=run.model["queue_size"] if recipe_cls.uses_queue else None)
    ds_cfg = resolve_ds_config(load_ds_config(args.deepspeed_config), plan, source=str(args.deepspeed_config))
    recipe = recipe_cls(run, RunEnv(0, world, torch.device("cpu"), plan.global_batch, plan.enqueue_batch))
    # reads shard manifests / annotation files (no images); the tokenizer is not needed until batches are made
    loader = recipe.train_loader(tokenizer=None)
    per_epoch = loader.batches_per_epoch // plan.grad_accum
    total = t.epochs * per_epoch if args.max_steps is None else min(t.epochs * per_epoch, args.max_steps)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[dry-run] task {run.task} ({args.config}); world {world} x micro batch {plan.micro_batch} x accum "
              f"{plan.grad_accum} = global batch {plan.global_batch}; {loader.batches_per_epoch} batches/rank/epoch "
              f"= {per_epoch} steps/epoch; {t.epochs} epochs = {total} optimiser steps; ZeRO-{zero_stage(ds_cfg)}, "
              f"{autocast_dtype(ds_cfg) or 'fp32'}; lr {t.lr:g} (warm-up {t.warmup_steps} steps), alpha {t.alpha}; "
              f"output {args.output_dir or t.output_dir}"
              + (f"; init {args.checkpoint or t.init_checkpoint}" if (args.checkpoint or t.init_checkpoint) else ""),
              flush=True)
    return 0
