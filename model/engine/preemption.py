"""Stop requests that end a run cleanly at a step boundary, with a checkpoint.

A request is either a signal delivered to a rank (SIGUSR1 by default: what
`srun` forwards and what `scancel --signal=USR1` sends) or the existence of a
stop file (what `slurm/common.sh` touches when the batch shell gets Slurm's
`--signal=B:USR1@...` warning). Ranks see a request at different times, so at
every step boundary they agree with an all-reduce (MAX) and all stop together.
SIGTERM keeps its default meaning (the launcher uses it to tear ranks down after
a failure); the last periodic checkpoint covers that case.
"""
from __future__ import annotations

import signal
from pathlib import Path

import torch
import torch.distributed as dist


class StopRequest:
    def __init__(self, stop_file: Path, signals: tuple[str, ...] = ("SIGUSR1",)):
        self.stop_file = stop_file
        self._signalled = False
        for name in signals:
            if not hasattr(signal, name):
                raise ValueError(f"train.stop_signals: unknown signal {name!r}")
            signal.signal(getattr(signal, name), self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self._signalled = True

    def local(self) -> bool:
        return self._signalled or self.stop_file.exists()

    def agreed(self, device: torch.device) -> bool:
        """True on every rank when any rank has seen a request (collective)."""
        flag = torch.tensor([1 if self.local() else 0], dtype=torch.int32, device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def clear(self) -> None:
        """Forget the request once it has been served (rank 0 removes the file)."""
        self._signalled = False
        self.stop_file.unlink(missing_ok=True)
