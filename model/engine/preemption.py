"""Stop requests that end a run cleanly at a step boundary, with a checkpoint.

A request is one of:
- a stop signal delivered to a rank (`train.stop_signals`, SIGUSR1 by default: what
  `srun` forwards and what `scancel --signal=USR1` sends);
- SIGTERM (Slurm preemption, `scancel`, the time limit, the deepspeed launcher
  tearing ranks down): Slurm sends SIGKILL `KillWait` seconds later (30 s by
  default), so it is served at the very next step boundary;
- the launcher above this rank exiting (`model.engine.dist_env.watch_launcher`:
  `deepspeed` killed with Ctrl-C or SIGTERM would otherwise leave the ranks training);
  it is handled exactly like a SIGTERM;
- the stop file (what `slurm/common.sh` touches when the batch shell gets Slurm's
  `--signal=B:USR1@...` warning), looked at every `train.stop_check_every` steps.

Ranks see a request at different times, yet must all stop at the same step (the
checkpoint is collective). At every optimiser step boundary each rank posts its
flag to an asynchronous all-reduce (MAX) on a CPU (gloo) group of its own, and
reads the result of the previous boundary's one: no device synchronisation and no
waiting, and every rank takes the same decision at the same step, one step after
the first rank saw the request. Steps that look at the stop file (and the last
step) wait for their own all-reduce, as before.

A SIGTERM before this launch's first optimiser step keeps its default meaning
(the process ends at once: there is nothing newer than the checkpoint it started
from). DataLoader workers ignore a SIGTERM that does not come from their rank:
Slurm signals every process of the step (and the deepspeed launcher its whole
process tree), and torch's worker handler would end the worker, which takes its
rank down before the checkpoint. A SIGTERM from the rank itself (torch's own
shutdown of a stuck worker) still ends it; workers end with their rank.
"""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from model.engine.dist_env import watch_launcher

TERMINATE = signal.SIGTERM


def _worker_keeps_running_through_sigterm() -> None:
    """In a DataLoader worker, right after torch set its signal handlers: SIGTERM is taken by a
    thread (`sigwaitinfo`) that ends the worker only when its rank sent it or the rank is gone."""
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {TERMINATE})   # the worker has one thread yet: all inherit it

    def wait() -> None:
        while True:
            info = signal.sigwaitinfo({TERMINATE})
            if info.si_pid == parent or os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=wait, name="sigterm-filter", daemon=True).start()


def _install_worker_sigterm_filter() -> bool:
    """Make DataLoader workers forked from here run `_worker_keeps_running_through_sigterm`.

    torch's `_worker_loop` calls `signal_handling._set_worker_signal_handlers()` first (its C
    SIGTERM handler ends the worker unless the rank sent it); we wrap that module attribute,
    which forked workers inherit. False where this torch has no such hook (workers then die).
    """
    try:
        from torch.utils.data._utils import signal_handling
    except ImportError:
        return False
    original = getattr(signal_handling, "_set_worker_signal_handlers", None)
    if original is None or not hasattr(signal, "sigwaitinfo"):
        return False
    if getattr(original, "albef_sigterm_filter", False):
        return True

    def set_worker_signal_handlers(*args, **kwargs):
        original(*args, **kwargs)
        _worker_keeps_running_through_sigterm()

    set_worker_signal_handlers.albef_sigterm_filter = True
    signal_handling._set_worker_signal_handlers = set_worker_signal_handlers
    return True


class StopRequest:
    """A rank's stop requests (signals, launcher exit, stop file) and the ranks' agreement on them."""

    def __init__(self, stop_file: Path, signals: tuple[str, ...] = ("SIGUSR1",), watch_parent: bool = True):
        self.stop_file = stop_file
        self._signalled = False
        self.reason: str | None = None      # "SIGTERM", "launcher gone", ... once a termination arrived
        self._pid = os.getpid()
        self._armed = False                 # SIGTERM is deferred only once a step has been done
        self._announced = False
        self._group = None
        self._pending: tuple | None = None
        self._launcher_reason: str | None = None
        for name in signals:
            if not hasattr(signal, name):
                raise ValueError(f"train.stop_signals: unknown signal {name!r}")
            if getattr(signal, name) != TERMINATE:     # SIGTERM always has the handler below
                signal.signal(getattr(signal, name), self._on_signal)
        signal.signal(TERMINATE, self._on_terminate)
        _install_worker_sigterm_filter()
        if watch_parent:
            watch_launcher(self._launcher_gone)

    # ------------------------------------------------------------------ signal handlers

    def _on_signal(self, signum, frame) -> None:
        self._signalled = True

    def _on_terminate(self, signum, frame) -> None:
        if os.getpid() != self._pid:        # a forked DataLoader worker: its rank decides
            return
        if not self._armed:                 # start-up: nothing to save yet, end as SIGTERM always did
            signal.signal(TERMINATE, signal.SIG_DFL)
            os.kill(os.getpid(), TERMINATE)
            return
        if self.reason is None:
            self.reason = self._launcher_reason or "SIGTERM"

    def _launcher_gone(self, what: str) -> None:
        """Called from the watch thread: turn it into a SIGTERM, which the main thread handles."""
        self._launcher_reason = f"{what} exited"
        os.kill(self._pid, TERMINATE)

    # ------------------------------------------------------------------ decisions

    def local(self) -> bool:
        return self._signalled or self.reason is not None or self.stop_file.exists()

    def agreed(self, device: torch.device) -> bool:
        """True on every rank when any rank has seen a request (collective, blocking)."""
        flag = torch.tensor([1 if self.local() else 0], dtype=torch.int32, device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def at_step_boundary(self, check_file: bool, final: bool = False) -> bool:
        """Collective, once per optimiser step on every rank with the same arguments: stop now?

        Signals are agreed with one step of delay (asynchronous all-reduce); `check_file`
        (every `stop_check_every` steps, after a checkpoint) and `final` wait for this step's.
        """
        self._armed = True
        if self.reason is not None and not self._announced:
            self._announced = True
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            print(f"[train] rank {rank}: {self.reason}: checkpoint at the next step boundary, then exit", flush=True)
        local = self._signalled or self.reason is not None or (check_file and self.stop_file.exists())
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return local
        if self._pending is not None:
            work, flag = self._pending
            self._pending = None
            work.wait()
            if flag.item():
                return True
        flag = torch.tensor([1 if local else 0], dtype=torch.int32)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._control_group(), async_op=True)
        if check_file or final:
            work.wait()
            return bool(flag.item())
        self._pending = (work, flag)
        return False

    def _control_group(self):
        """A gloo group for the stop flags (created collectively at the first step boundary):
        CPU tensors, so agreeing never waits for the device."""
        if self._group is None:
            self._group = dist.new_group(backend="gloo")
        return self._group

    def clear(self) -> None:
        """Forget the request once it has been served (rank 0 removes the file)."""
        self._signalled = False
        self.stop_file.unlink(missing_ok=True)
