"""Training checkpoints: the DeepSpeed engine's files plus the state it does not keep.

Layout of `<run>/checkpoints/` (under ZeRO-1/2 DeepSpeed saves `client_state` from rank 0 only, so per-rank state gets files of its own):

    step000001000/                 one complete checkpoint (tag = optimiser step)
        <DeepSpeed files>          module, optimizer partitions, lr scheduler
        extra_state.pt             rank 0: step, epoch, alpha, queues, config
        rank{R}_state.pt           every rank: RNG states (torch, cuda, numpy, python,
                                   the sampling generator)
        loader_rank{R}.json        every rank: its data-loader position
    latest                         the tag of the newest complete checkpoint

Crash safety: everything is written into `.tmp-<tag>/`; after a barrier rank 0
renames it to `<tag>/` and only then replaces `latest` (atomically). A crash
while saving leaves a `.tmp-*` folder that is ignored and later removed, and the
previous checkpoint stays the one `--resume auto` picks.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

TAG_PATTERN = re.compile(r"^step(\d+)$")
TMP_PREFIX = ".tmp-"
LATEST = "latest"
EXTRA_STATE = "extra_state.pt"


def tag_for_step(step: int) -> str:
    return f"step{step:09d}"


def rank_state_name(rank: int) -> str:
    return f"rank{rank}_state.pt"


def loader_state_name(rank: int) -> str:
    return f"loader_rank{rank}.json"


def capture_rng(generator: torch.Generator) -> dict[str, Any]:
    """Every random stream a training step draws from on this rank."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "generator": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _broadcast_from_rank0(value: Any) -> Any:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Complete checkpoint tags in `ckpt_dir`, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for child in ckpt_dir.iterdir():
        match = TAG_PATTERN.match(child.name)
        if match and child.is_dir() and (child / EXTRA_STATE).is_file():
            found.append((int(match.group(1)), child.name))
    return [name for _, name in sorted(found)]


def newest_complete(ckpt_dir: Path) -> Path | None:
    """The checkpoint `latest` names if it is complete, else the newest complete one."""
    latest = ckpt_dir / LATEST
    if latest.is_file():
        tag = latest.read_text().strip()
        if TAG_PATTERN.match(tag) and (ckpt_dir / tag / EXTRA_STATE).is_file():
            return ckpt_dir / tag
    tags = complete_tags(ckpt_dir)
    return ckpt_dir / tags[-1] if tags else None


class CheckpointManager:
    """Saves and finds checkpoints under one run's `checkpoints/` folder (collective calls)."""

    def __init__(self, ckpt_dir: str | Path, keep_last: int, rank: int, world_size: int):
        if keep_last < 1:
            raise ValueError(f"train.keep_checkpoints must be >= 1, got {keep_last}")
        self.dir = Path(ckpt_dir)
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size

    def resolve(self, resume: str | None) -> Path | None:
        """The checkpoint folder to resume from: None (fresh), `auto`, or an explicit path.

        Rank 0 decides and broadcasts, so every rank loads the same tag.
        """
        if resume is None:
            return None
        if resume == "auto":
            found = newest_complete(self.dir) if self.rank == 0 else None
            found = _broadcast_from_rank0(None if found is None else str(found))
            return None if found is None else Path(found)
        path = Path(resume)
        if path.is_dir() and not (path / EXTRA_STATE).is_file():
            nested = newest_complete(path)
            if nested is not None:
                path = nested
        if not (path / EXTRA_STATE).is_file():
            raise FileNotFoundError(
                f"--resume {resume}: no complete checkpoint there (expected {path / EXTRA_STATE})")
        return path

    def save(self, engine, step: int, extra_state: dict, rank_state: dict, loader_state: dict) -> Path:
        """Write one checkpoint for optimiser step `step`; returns its final folder."""
        tag = tag_for_step(step)
        tmp_tag = TMP_PREFIX + tag
        tmp_dir = self.dir / tmp_tag
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp_dir, ignore_errors=True)
        _barrier()
        engine.save_checkpoint(str(self.dir), tag=tmp_tag, save_latest=False)
        tmp_dir.mkdir(parents=True, exist_ok=True)
        torch.save(rank_state, tmp_dir / rank_state_name(self.rank))
        (tmp_dir / loader_state_name(self.rank)).write_text(json.dumps(loader_state))
        if self.rank == 0:
            torch.save({**extra_state, "world_size": self.world_size, "step": step}, tmp_dir / EXTRA_STATE)
        _barrier()
        final = self.dir / tag
        if self.rank == 0:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp_dir, final)
            latest_tmp = self.dir / (LATEST + ".tmp")
            latest_tmp.write_text(tag)
            os.replace(latest_tmp, self.dir / LATEST)
            self._prune(keep=tag)
        _barrier()
        return final

    def _prune(self, keep: str) -> None:
        tags = [t for t in complete_tags(self.dir) if t != keep]
        for old in tags[: max(0, len(tags) - (self.keep_last - 1))]:
            shutil.rmtree(self.dir / old, ignore_errors=True)
        for child in self.dir.iterdir():
            if child.name.startswith(TMP_PREFIX) and child.is_dir():
                shutil.rmtree(child, ignore_errors=True)

    def load(self, engine, path: Path) -> tuple[dict, dict, dict]:
        """Load engine state and return (extra_state, this rank's state, its loader state)."""
        extra = torch.load(path / EXTRA_STATE, map_location="cpu", weights_only=False)
        if extra["world_size"] != self.world_size:
            raise ValueError(
                f"checkpoint {path} was written by {extra['world_size']} ranks, this run has "
                f"{self.world_size}: per-rank data positions cannot be mapped; resume with "
                f"{extra['world_size']} ranks")
        load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=True,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise FileNotFoundError(f"DeepSpeed found no engine checkpoint in {path}")
        rank_state = torch.load(path / rank_state_name(self.rank), map_location="cpu", weights_only=False)
        loader_state = json.loads((path / loader_state_name(self.rank)).read_text())
        return extra, rank_state, loader_state
