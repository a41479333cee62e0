"""The command lines of `model/train.py`, `model/evaluate.py` and the `model/retrieval.py` alias.

The entry files stay thin (nothing imports them); their parsing and error
handling live here so that every entry behaves the same: a configuration or
input error exits 2 with one line, before any process group starts where possible.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from model.albef import text_settings_from_tokenizer
from model.engine.dist_env import apply_slurm_env
from model.engine.recipe import RunEnv
from model.tasks import load_run
from pipeline.tokenize import load_tokenizer


def parse_train_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="ALBEF training (pretraining and fine-tuning) with DeepSpeed ZeRO")
    parser.add_argument("--config", required=True, help="run config YAML (e.g. configs/pretrain_4m.yaml)")
    parser.add_argument("--deepspeed_config", required=True, help="DeepSpeed JSON (e.g. ds_configs/zero2.json)")
    parser.add_argument("--output-dir", help="run folder (default: train.output_dir of the config)")
    parser.add_argument("--resume", help="'auto' (newest complete checkpoint of the run folder, if any) or a path")
    parser.add_argument("--checkpoint", help="weights to start fine-tuning from (file, run folder or checkpoint)")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimiser steps (schedule unchanged)")
    parser.add_argument("--stop-file", help="a file whose appearance asks for checkpoint-and-exit "
                                            "(default: <output-dir>/stop_requested)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check config, DeepSpeed JSON and data, print the plan, exit (no engine)")
    parser.add_argument("--world-size", type=int, help="--dry-run: ranks to plan for (default: the launcher's)")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    return parser.parse_args(argv)


def train_main(argv: list[str] | None = None, task: str | None = None) -> int:
    """`model/train.py`: exit 0 on success, 2 on a configuration or input error (one line)."""
    args = parse_train_args(argv)
    try:
        recipe_cls, run = load_run(args.config, args.overrides, task=task)
        if args.dry_run:
            from model.engine.plan import dry_run
            return dry_run(args, recipe_cls, run)
        from model.engine.trainer import CollapseError, run_training
        try:
            return run_training(args, recipe_cls, run)
        except CollapseError as err:
            print(f"[train] rank {os.environ.get('RANK', '0')}: stopped: {err}", file=sys.stderr, flush=True)
            return 3
    except (ValueError, FileNotFoundError) as err:
        print(f"[train] rank {os.environ.get('RANK', '0')}: error: {err}", file=sys.stderr, flush=True)
        return 2



def parse_evaluate_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Evaluate a checkpoint on a task's split")
    _evaluate_arguments(parser)
    return parser.parse_args(argv)


def _evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="released-layout file, export, run or checkpoint folder")
    parser.add_argument("--config", required=True, help="task config (e.g. configs/retrieval_flickr.yaml)")
    parser.add_argument("--split", help="split to evaluate (default: the task's first, e.g. test)")
    parser.add_argument("--output", help="result JSON (default: next to the checkpoint)")
    parser.add_argument("--device", help="cpu, cuda (default: cuda when available)")
    parser.add_argument("--save-scores", action="store_true", help="also write score matrices (.npz), where the "
                                                                   "task has them (retrieval)")
    parser.add_argument("--save-heatmaps", type=int, default=0, metavar="N",
                        help="draw N examples as pictures, where the task has them (grounding)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value config overrides")


def default_output(checkpoint: str, config: str, split: str) -> Path:
    ckpt = Path(checkpoint)
    name = f"{Path(config).stem}_{split}.json"
    return ckpt / name if ckpt.is_dir() else ckpt.with_name(f"{ckpt.stem}.{name}")


def _device(name: str | None) -> torch.device:
    use_cuda = name == "cuda" or (name is None and torch.cuda.is_available())
    if not use_cuda:
        return torch.device(name or "cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    return device


def _init_distributed(device: torch.device) -> tuple[int, int]:
    apply_slurm_env()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=30))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def evaluate(args: argparse.Namespace, task: str | None = None) -> int:
    recipe_cls, run = load_run(args.config, args.overrides, task=task)
    split = args.split or recipe_cls(run, None).splits()[0]
    device = _device(args.device)
    rank, world = _init_distributed(device)
    recipe = recipe_cls(run, RunEnv(rank, world, device, 0, 0))
    tokenizer = load_tokenizer(run.model["text"]["tokenizer"])
    run.model["text"].update(text_settings_from_tokenizer(tokenizer))
    model = recipe.build_model(tokenizer, args.checkpoint)
    model.to(device).eval()
    args.output = str(Path(args.output) if args.output else default_output(args.checkpoint, args.config, split))
    record = recipe.evaluate_split(model, tokenizer, split, args)
    if rank == 0:
        out = Path(args.output)
        table = record.pop("table", "")
        record.setdefault("world_size", world)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record) + "\n")
        if table:
            print(table)
        print(f"written: {out}")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


def evaluate_main(argv: list[str] | None = None, task: str | None = None) -> int:
    """`python -m model.evaluate`: exit 0 on success, 2 on a configuration or input error (one line)."""
    args = parse_evaluate_args(argv)
    try:
        return evaluate(args, task)
    except (ValueError, FileNotFoundError) as err:
        print(f"[evaluate] rank {os.environ.get('RANK', '0')}: error: {err}", file=sys.stderr, flush=True)
        return 2
