"""Training checkpoints: the DeepSpeed engine's files plus the state it does not keep.

Layout of `<run>/checkpoints/` (under ZeRO-1/2 DeepSpeed saves `client_state` from rank 0 only, so per-rank state gets files of its own):

    step000001000/                 one complete checkpoint (tag = optimiser step)
        <DeepSpeed files>          module, optimizer partitions, lr scheduler
        extra_state.pt             rank 0: step, epoch, alpha, queues, config
        rank{R}_state.pt           every rank: RNG states (torch, cuda, numpy, python,
                                   the sampling generator), as tensors and numbers
        loader_rank{R}.json        every rank: its data-loader position
        checksums.json             rank 0: bytes + sha256 of every file above
    latest                         the tag of the newest complete checkpoint

Crash safety: everything is written into `.tmp-<tag>/`; after a barrier rank 0
renames it to `<tag>/` and only then replaces `latest` (atomically). A crash
while saving leaves a `.tmp-*` folder that is ignored and later removed, and the
previous checkpoint stays the one `--resume auto` picks.

Integrity: before the rename, each rank hashes (streamed sha256) the files it
wrote (`file_owner`: DeepSpeed's `*pp_rank_R_*` and our `rank{R}_*` files belong
to rank R, everything else to rank 0) and rank 0 writes `checksums.json` (name ->
bytes, sha256) into the folder, so a damaged file is caught before anything reads
it. On resume every rank checks its own share again (size first, then the hash)
and the ranks agree; `--resume auto` falls back to the newest intact checkpoint
with a warning, and stops with one line when none is. A checkpoint written before
checksums existed loads with a note (not verified).

Safety: nothing is unpickled in full. Our files and DeepSpeed's are read with
`torch.load(weights_only=True)` (`model/engine/safe_load.py`); the RNG states are
stored as tensors and plain numbers.
"""
from __future__ import annotations

import hashlib
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

from model.engine.safe_load import LEGACY_RNG_GLOBALS, deepspeed_loads_weights_only, plain, safe_load

TAG_PATTERN = re.compile(r"^step(\d+)$")
TMP_PREFIX = ".tmp-"
LATEST = "latest"
EXTRA_STATE = "extra_state.pt"
CHECKSUMS = "checksums.json"
RNG_FORMAT = 2   # 2: numpy/python RNG states as tensors + numbers; 1 (no key): the raw tuples


def tag_for_step(step: int) -> str:
    return f"step{step:09d}"


def rank_state_name(rank: int) -> str:
    return f"rank{rank}_state.pt"


def loader_state_name(rank: int) -> str:
    return f"loader_rank{rank}.json"


def capture_rng(generator: torch.Generator) -> dict[str, Any]:
    """Every random stream a training step draws from on this rank, as tensors and plain numbers
    (what a weights-only load reads back)."""
    kind, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "format": RNG_FORMAT,
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "generator": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    """Restore `capture_rng`'s state; also reads the raw tuples of format-1 files."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = (numpy_state["kind"], numpy_state["key"].numpy().astype(np.uint32), numpy_state["pos"],
                       numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    np.random.set_state(numpy_state)
    python_state = state["python"]
    if isinstance(python_state, dict):
        python_state = (python_state["version"], tuple(int(v) for v in python_state["state"].tolist()),
                        python_state["gauss_next"])
    random.setstate(python_state)
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def load_rank_state(path: Path) -> dict[str, Any]:
    """A `rank{R}_state.pt`, weights-only; format-1 files need numpy's array globals and nothing more."""
    return safe_load(path, LEGACY_RNG_GLOBALS)


# ------------------------------------------------------------------ checksums

_OWNER_PATTERNS = (re.compile(r"(?:^|_)pp_rank_(\d+)_"), re.compile(r"^(?:loader_)?rank(\d+)[_.]"))


def file_owner(name: str, world_size: int) -> int:
    """The rank that writes (and hashes, and verifies) checkpoint file `name`."""
    base = name.rsplit("/", 1)[-1]
    for pattern in _OWNER_PATTERNS:
        match = pattern.search(base)
        if match:
            return int(match.group(1)) % max(world_size, 1)
    return 0


def sha256_file(path: Path) -> str:
    """Streamed sha256 (GB-sized files never sit in memory)."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def checkpoint_files(tag_dir: Path) -> list[str]:
    """Every file of a checkpoint folder (relative, `/`-separated), checksums.json excluded."""
    return sorted(p.relative_to(tag_dir).as_posix() for p in tag_dir.rglob("*")
                  if p.is_file() and p.name != CHECKSUMS)


def file_problem(tag_dir: Path, name: str, expected: dict) -> str | None:
    """Why `name` does not match its recorded size and sha256, or None."""
    path = tag_dir / name
    if not path.is_file():
        return f"{name} is missing"
    size = path.stat().st_size
    if size != expected["bytes"]:
        return f"{name} has {size} bytes, {expected['bytes']} were written"
    if sha256_file(path) != expected["sha256"]:
        return f"{name} does not match its sha256"
    return None


def read_checksums(tag_dir: Path) -> dict | None:
    """`checksums.json` of a checkpoint: {name: {bytes, sha256}}; None when the checkpoint predates them.

    Raises ValueError when the file exists but cannot be read.
    """
    path = tag_dir / CHECKSUMS
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        files = record["files"]
        if not all(isinstance(v, dict) and {"bytes", "sha256"} <= set(v) for v in files.values()):
            raise ValueError("entry without bytes/sha256")
        return files
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{CHECKSUMS} is unreadable ({err})") from None


def verify_files(tag_dir: Path, names: list[str] | None = None) -> tuple[str, str | None]:
    """Check files of one checkpoint in this process: ("ok" | "unverified" | "damaged", problem).

    `names`: the files the caller will read (default: all recorded ones).
    """
    try:
        recorded = read_checksums(tag_dir)
    except ValueError as err:
        return "damaged", str(err)
    if recorded is None:
        return "unverified", None
    for name in sorted(recorded if names is None else names):
        if name not in recorded:
            return "damaged", f"{name} is not in {CHECKSUMS}"
        problem = file_problem(tag_dir, name, recorded[name])
        if problem:
            return "damaged", problem
    return "ok", None


def _all_gather(value: Any, world_size: int) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()) or world_size == 1:
        return [value]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, value)
    return out


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

        Rank 0 lists the candidates and broadcasts them, every rank verifies its share of
        each one's files, and all agree, so every rank loads the same intact tag.
        `auto` falls back past damaged checkpoints (newest first); an explicit one must be intact.
        """
        if resume is None:
            return None
        if resume == "auto":
            names = [p.name for p in self._candidates()] if self.rank == 0 else None
            names = _broadcast_from_rank0(names)
            damaged = []
            for name in names:
                path = self.dir / name
                status, problem = self.verify(path)
                if status != "damaged":
                    self._note(path, status)
                    return path
                damaged.append(f"{name}: {problem}")
                self._say(f"[train] warning: checkpoint {path} is damaged ({problem}); "
                          f"trying the previous one")
            if damaged:
                raise ValueError(f"--resume auto: no intact checkpoint in {self.dir} ({'; '.join(damaged)})")
            return None
        path = Path(resume)
        if path.is_dir() and not (path / EXTRA_STATE).is_file():
            nested = newest_complete(path)
            if nested is not None:
                path = nested
        if not (path / EXTRA_STATE).is_file():
            raise FileNotFoundError(
                f"--resume {resume}: no complete checkpoint there (expected {path / EXTRA_STATE})")
        status, problem = self.verify(path)
        if status == "damaged":
            raise ValueError(f"--resume {resume}: checkpoint {path} is damaged ({problem})")
        self._note(path, status)
        return path

    def _candidates(self) -> list[Path]:
        """Complete checkpoints, the one `latest` names first, then newest to oldest."""
        tags = complete_tags(self.dir)[::-1]
        first = newest_complete(self.dir)
        if first is not None and first.name in tags:
            tags.remove(first.name)
            tags.insert(0, first.name)
        return [self.dir / tag for tag in tags]

    def verify(self, path: Path) -> tuple[str, str | None]:
        """Collective: ("ok" | "unverified" | "damaged", first problem found by any rank).

        Rank 0 reads checksums.json and broadcasts it; each rank checks the files it owns.
        """
        try:
            recorded = read_checksums(path) if self.rank == 0 else None
            verdict = ("ok" if recorded is not None else "unverified", recorded)
        except ValueError as err:
            verdict = ("damaged", str(err))
        status, payload = _broadcast_from_rank0(verdict if self.rank == 0 else None)
        if status != "ok":
            return status, payload if status == "damaged" else None
        mine = [n for n in sorted(payload) if file_owner(n, self.world_size) == self.rank]
        problem = next((p for p in (file_problem(path, n, payload[n]) for n in mine) if p), None)
        problems = [p for p in _all_gather(problem, self.world_size) if p]
        return ("damaged", problems[0]) if problems else ("ok", None)

    def _say(self, line: str) -> None:
        if self.rank == 0:
            print(line, flush=True)

    def _note(self, path: Path, status: str) -> None:
        if status == "unverified":
            self._say(f"[train] note: checkpoint {path} has no {CHECKSUMS} (written before checksums were "
                      f"recorded): its files are not verified")

    def _record_checksums(self, tmp_dir: Path) -> None:
        """Collective, after every rank has written: each rank hashes its own files, rank 0 writes
        checksums.json (before the folder is renamed and `latest` names it)."""
        mine = {}
        for name in checkpoint_files(tmp_dir):
            if file_owner(name, self.world_size) == self.rank:
                mine[name] = {"bytes": (tmp_dir / name).stat().st_size, "sha256": sha256_file(tmp_dir / name)}
        gathered = _all_gather(mine, self.world_size)
        if self.rank == 0:
            files = {name: entry for part in gathered for name, entry in part.items()}
            record = {"algorithm": "sha256", "files": dict(sorted(files.items()))}
            tmp = tmp_dir / (CHECKSUMS + ".tmp")
            tmp.write_text(json.dumps(record, indent=1) + "\n")
            os.replace(tmp, tmp_dir / CHECKSUMS)

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
        torch.save(plain(rank_state), tmp_dir / rank_state_name(self.rank))
        (tmp_dir / loader_state_name(self.rank)).write_text(json.dumps(loader_state))
        if self.rank == 0:
            torch.save(plain({**extra_state, "world_size": self.world_size, "step": step}), tmp_dir / EXTRA_STATE)
        _barrier()
        self._record_checksums(tmp_dir)
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
        """Load engine state and return (extra_state, this rank's state, its loader state).

        Every file is read weights-only: a file that holds anything but tensors and plain
        data (a pickle that could run code) is refused with `UnsafeCheckpointError`.
        """
        extra = safe_load(path / EXTRA_STATE)
        if extra["world_size"] != self.world_size:
            raise ValueError(
                f"checkpoint {path} was written by {extra['world_size']} ranks, this run has "
                f"{self.world_size}: per-rank data positions cannot be mapped; resume with "
                f"{extra['world_size']} ranks")
        with deepspeed_loads_weights_only():
            load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=True,
                                                  load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise FileNotFoundError(f"DeepSpeed found no engine checkpoint in {path}")
        rank_state = load_rank_state(path / rank_state_name(self.rank))
        loader_state = json.loads((path / loader_state_name(self.rank)).read_text())
        return extra, rank_state, loader_state
