"""torch.distributed rendezvous variables from a Slurm task environment.

`deepspeed` and `torchrun` export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT themselves. A task started by `srun` only has Slurm's variables; this
module derives the torch ones from them so `srun python model/train.py ...` needs
no wrapper. A plain `python model/train.py ...` (no launcher, no job step; also
inside a batch script without srun) is one process: world size 1. Variables
already set are never overwritten.
"""
from __future__ import annotations

import os
import re
import socket
from typing import Mapping, MutableMapping

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
