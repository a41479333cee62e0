"""torch.distributed rendezvous variables from a Slurm task environment.

`deepspeed` and `torchrun` export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT themselves. A task started by `srun` only has Slurm's variables; this
module derives the torch ones from them so `srun python model/train.py ...` needs
no wrapper. A plain `python model/train.py ...` (no launcher, no job step; also
inside a batch script without srun) is one process: world size 1. Variables
already set are never overwritten.

`watch_launcher` keeps ranks from outliving their launcher: `deepspeed` runs
`python -m deepspeed.launcher.launch`, which starts the ranks; killing the top
`deepspeed` (Ctrl-C sent to it alone, SIGTERM) leaves that per-node launcher and
its ranks training on. Each rank watches the launcher processes above it (pidfd)
and is told when one exits.
"""
from __future__ import annotations

import os
import re
import select
import socket
import sys
import threading
import time
from typing import Callable, Mapping, MutableMapping

# MASTER_PORT when neither it nor a job id is given (torch's usual default).
DEFAULT_MASTER_PORT = 29500
# With a job id, the port is PORT_BASE + job_id % PORT_SPAN so that two jobs
# sharing a first node do not collide.
PORT_BASE = 20000
PORT_SPAN = 20000


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm host list: `gpu[01-03,07],cpu5` -> gpu01 gpu02 gpu03 gpu07 cpu5."""
    hosts: list[str] = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?([^,]*)", nodelist):
        prefix, ranges, suffix = match.groups()
        if not prefix:
            continue
        if ranges is None:
            hosts.append(prefix + suffix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(f"{prefix}{lo}{suffix}")
                continue
            width = len(lo)
            for i in range(int(lo), int(hi) + 1):
                hosts.append(f"{prefix}{i:0{width}d}{suffix}")
    if not hosts:
        raise ValueError(f"cannot parse SLURM_NODELIST {nodelist!r}")
    return hosts


def slurm_rendezvous(env: Mapping[str, str]) -> dict[str, str]:
    """The torch.distributed variables a Slurm task implies (empty outside a Slurm job step).

    Only `srun` tasks (which have SLURM_STEP_ID) count: a batch script's own shell
    also has SLURM_PROCID=0 and SLURM_NTASKS=N, but it is one process.
    """
    if "SLURM_STEP_ID" not in env or "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
        return {}
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise ValueError("Slurm task without SLURM_NODELIST: cannot choose MASTER_ADDR")
    job_id = env.get("SLURM_JOB_ID")
    port = PORT_BASE + int(job_id) % PORT_SPAN if job_id and job_id.isdigit() else DEFAULT_MASTER_PORT
    ntasks = int(env["SLURM_NTASKS"])
    nnodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": str(ntasks),
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": str(max(1, ntasks // max(1, nnodes))),
        "MASTER_ADDR": expand_nodelist(nodelist)[0],
        "MASTER_PORT": str(port),
    }


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_rendezvous() -> dict[str, str]:
    """World size 1 on a free loopback port."""
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}


def apply_slurm_env(env: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Fill missing torch.distributed variables: from Slurm's in an `srun` task, else for one
    process; returns what was set."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return {}
    derived = slurm_rendezvous(env) or single_process_rendezvous()
    derived = {k: v for k, v in derived.items() if k not in env}
    env.update(derived)
    return derived


def init_engine_process_group(local_rank_arg: int | None, timeout_s: float):
    """Join the process group of a DeepSpeed job on this rank's device.

    Returns (rank, world_size, device); CUDA with NCCL where a GPU is present,
    otherwise the CPU with gloo.
    """
    import datetime
    import importlib

    import deepspeed
    import torch
    import torch.distributed as dist

    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank_arg or 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    else:
        # CPU ranks (tests, the demo) use gloo's collectives. DeepSpeed would first JIT-compile its
        # shared-memory all-reduce (minutes of C++ on a small machine, redone when concurrent
        # launches race on the build folder); gloo is plenty for CPU runs.
        # (importlib: `import deepspeed.comm.torch as m` would bind the `torch` attribute of deepspeed.comm)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo",
                               timeout=datetime.timedelta(seconds=timeout_s))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


# ------------------------------------------------------------------ launcher watch

# After the launcher is gone the rank stops at its next step boundary with a checkpoint;
# if it is still alive this much later (stuck in I/O or a collective), it exits hard.
ORPHAN_GRACE_S = 300.0
_PER_NODE_LAUNCHERS = ("deepspeed.launcher.launch", "torch.distributed.run", "torch.distributed.launch")
_TOP_LAUNCHERS = ("deepspeed", "deepspeed.launcher.runner", "torchrun")


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _is_launcher(args: list[str], names: tuple[str, ...]) -> bool:
    return any(a in names or os.path.basename(a) in names for a in args[:4])


def launcher_pids(pid: int | None = None) -> list[tuple[int, str]]:
    """(pid, description) of the launchers above this process: its parent when that is a per-node
    launcher (deepspeed's, torchrun's), and that launcher's parent when it is `deepspeed`/`torchrun`."""
    ppid = _parent_of(pid or os.getpid())
    if ppid is None or ppid <= 1:
        return []
    args = _cmdline(ppid)
    if not _is_launcher(args, _PER_NODE_LAUNCHERS) and not _is_launcher(args, _TOP_LAUNCHERS):
        return []
    found = [(ppid, "the per-node launcher")]
    top = _parent_of(ppid)
    if top and top > 1 and _is_launcher(_cmdline(top), _TOP_LAUNCHERS):
        found.append((top, "the launcher"))
    return found


def _wait_any_exit(pids: list[int]) -> int:
    """Block until one of `pids` exits; returns it (pidfd where the kernel has it, else polling)."""
    fds = {}
    try:
        for pid in pids:
            try:
                fds[os.pidfd_open(pid)] = pid
            except ProcessLookupError:
                return pid
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        return fds[poller.poll()[0][0]]
    except (AttributeError, OSError):        # no pidfd_open (old kernel, not Linux): poll every second
        while True:
            for pid in pids:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    return pid
                except PermissionError:
                    pass
            time.sleep(1.0)
    finally:
        for fd in fds:
            os.close(fd)


def watch_launcher(on_gone: Callable[[str], None], grace_s: float = ORPHAN_GRACE_S) -> threading.Thread | None:
    """Call `on_gone(description)` once (from a daemon thread) when a launcher above this rank exits;
    `grace_s` later, if the process still runs, exit it hard. None when no launcher is above it."""
    launchers = launcher_pids()
    if not launchers:
        return None
    names = dict(launchers)

    def watch() -> None:
        gone = _wait_any_exit(list(names))
        print(f"[train] pid {os.getpid()}: {names[gone]} (pid {gone}) exited: stopping", file=sys.stderr, flush=True)
        on_gone(f"{names[gone]} (pid {gone})")
        time.sleep(grace_s)
        print(f"[train] pid {os.getpid()}: still running {grace_s:.0f}s after the launcher exited: exiting",
              file=sys.stderr, flush=True)
        os._exit(1)

    thread = threading.Thread(target=watch, name="launcher-watch", daemon=True)
    thread.start()
    return thread
