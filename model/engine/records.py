"""Per-step debug records (`train.debug_records: true`): fingerprints of the training state.

The resume and ZeRO tests compare them across runs and ranks. Each fingerprint
works on this rank's data only (under ZeRO-3 a parameter's local partition,
`ds_tensor`), but each reads the device, so they are off by default: a normal
run's loop never waits for the device outside its logging steps.
"""
from __future__ import annotations

import os
import time

import torch

QUEUE_BUFFERS = ("image_queue", "text_queue")


def local_tensor(p: torch.Tensor) -> torch.Tensor:
    """This rank's data of a parameter: its ZeRO-3 partition, or the tensor itself."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p


def queue_checksum(module: torch.nn.Module) -> float:
    """Position-sensitive fingerprint of the feature queues (equal on every rank when in sync)."""
    total = 0.0
    for name in QUEUE_BUFFERS:
        q = getattr(module.queue, name)  # [D, Q]
        cols = q.sum(0, dtype=torch.float64)
        weights = torch.arange(1, cols.numel() + 1, dtype=torch.float64, device=cols.device)
        total += float((cols * weights).sum()) / cols.numel()
    return total


def momentum_params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p for _, momentum in module.momentum_modules() for p in momentum.parameters()]


def momentum_checksum(module: torch.nn.Module) -> float:
    """Sum of this rank's momentum-model data (its partitions under ZeRO-3)."""
    return float(sum(local_tensor(p).sum(dtype=torch.float64) for p in momentum_params(module)))


def batch_fingerprint(input_ids: torch.Tensor) -> int:
    """Identifies which captions a batch holds (for resume checks), independent of padding."""
    weights = torch.arange(1, input_ids.shape[1] + 1, device=input_ids.device)
    return int((input_ids * weights).sum())


def _queue_fields(module: torch.nn.Module) -> dict:
    if not hasattr(module, "queue"):
        return {}
    return {"queue_checksum": queue_checksum(module), "queue_ptr": int(module.queue.queue_ptr),
            "queue_dtypes": sorted({str(getattr(module.queue, n).dtype) for n in QUEUE_BUFFERS})}


def _momentum_fields(module: torch.nn.Module) -> dict:
    if not hasattr(module, "momentum_modules"):
        return {}
    params = momentum_params(module)
    return {"momentum_checksum": momentum_checksum(module),
            "momentum_dtypes": sorted({str(local_tensor(p).dtype) for p in params})}


def start_record(trainer) -> dict:
    """The first record of every launch (`train.debug_records`): where the run starts from."""
    module = trainer.module
    return {
        "event": "start", "rank": trainer.rank, "pid": os.getpid(), "world_size": trainer.world,
        "zero_stage": trainer.zero_stage, "step": trainer.step, "micro_step": trainer.micro_step,
        "epoch": trainer.epoch, "total_steps": trainer.total_steps, "batches_per_epoch": trainer.batches_per_epoch,
        "global_batch": trainer.plan.global_batch, "resumed_from": trainer.resumed_from,
        "loader_state": trainer.loader.state_dict(), "task": trainer.run.task,
        "momentum_partitioned": any(hasattr(p, "ds_tensor") for p in momentum_params(module))
        if hasattr(module, "momentum_modules") else False,
        **_queue_fields(module), **_momentum_fields(module),
    }


def debug_record(trainer, lr: float, alpha: float, step_sums: dict, debug: dict) -> dict:
    """One optimiser step's record: losses, batch fingerprints, queue and momentum checksums, memory."""
    from model.engine.progress import memory_mb, peak_memory_mb
    return {
        "step": trainer.step, "micro_step": trainer.micro_step, "epoch": trainer.epoch, "rank": trainer.rank,
        "time": time.time(), "lr": lr, "alpha": alpha, **step_sums, "batch_fingerprint": debug["fingerprint"],
        "image_checksum": debug["image_sum"], **_queue_fields(trainer.module), **_momentum_fields(trainer.module),
        "mem_mb": memory_mb(trainer.device), "peak_mem_mb": peak_memory_mb(trainer.device),
        "data_wait_s": debug["wait_s"],
    }
