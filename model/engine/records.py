"""Fingerprints of the training state for the per-step records (and the tests that read them).

Each is cheap next to a training step and works on this rank's data only: under
ZeRO-3 a parameter's local partition (`ds_tensor`), else the tensor itself.
"""
from __future__ import annotations

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
