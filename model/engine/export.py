"""Consolidated fp32 export of a training engine in the released ALBEF layout.

`zero_to_fp32` is not used (docs/METHOD.md §7: it drops frozen parameters outside
ZeRO-2/3 fragments and turns the integer `queue_ptr` into a float). Instead the
live engine's full parameters are gathered (ZeRO-3) or read (ZeRO-0/1/2) and
the recipe's `export_state_dict` (`model.weights.released.export_albef_state_dict` for ALBEF) writes the released layout, momentum
model and queues included. The file is `{"model": state_dict, "config": cfg,
"step": ..., "epoch": ...}` like the released `ALBEF_4M.pth`, so
`model.weights.released.load_albef_state_dict` and the evaluation read it.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist


EXPORT_NAME = "albef.pth"


def _gathered(module: torch.nn.Module, zero_stage: int):
    if zero_stage != 3:
        return contextlib.nullcontext()
    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)


def export_engine(engine, state_fn, cfg: dict, step: int, epoch: int, out_dir: Path, zero_stage: int,
                  scalar_params: list[str]) -> Path | None:
    """Write `out_dir/albef.pth` from rank 0 (collective under ZeRO-3); returns the path on rank 0.

    `state_fn(module)`: the state dict to write (the recipe's `export_state_dict`:
    the released layout for ALBEF models). `scalar_params`: parameters the trainer
    gave shape [1] for DeepSpeed (`model.engine.trainer.vectorise_scalar_params`);
    they are written 0-d, as released.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    module = engine.module
    with _gathered(module, zero_stage):
        state = None
        if rank == 0:
            state = {k: v.detach().to("cpu", copy=True) for k, v in state_fn(module).items()}
            for name in scalar_params:
                if name in state:
                    state[name] = state[name].reshape(())
    path = None
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / EXPORT_NAME
        tmp = out_dir / (EXPORT_NAME + ".tmp")
        torch.save({"model": state, "config": cfg, "step": step, "epoch": epoch}, tmp)
        os.replace(tmp, path)
    if dist.is_initialized():
        dist.barrier()
    return path
