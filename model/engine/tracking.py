"""Where a run's reports go besides the CSV and TensorBoard files (`model/engine/progress.py`).

- `WandbRun`: Weights & Biases (`train.report_to: [..., wandb]`, extra `tracking`).
  Its files live in `logs/wandb/`; the run id is kept in `logs/wandb_run_id` so a
  resumed run continues the same W&B run. `WANDB_MODE=offline` writes the run
  there without any network (`wandb sync logs/wandb/offline-run-*` uploads it
  later); project and entity come from `WANDB_PROJECT` / `WANDB_ENTITY` (default project "albef").
- `TeeOutput`: rank 0's stdout and stderr also go to `logs/train.log` (outside
  Slurm, whose job log already keeps them), at the file-descriptor level so
  DeepSpeed's and the C++ libraries' lines are kept too.
- `rank_devices`: the start line's summary of every rank's device and backend.
"""
from __future__ import annotations

import os
import sys
import threading
import traceback
import uuid
from pathlib import Path

WANDB_ID_FILE = "wandb_run_id"
TRAIN_LOG = "train.log"


class WandbRun:
    """Rank 0's W&B run: the same scalars as the CSV and TensorBoard, keyed `train/...` and `eval/...`."""

    def __init__(self, log_dir: Path, name: str, config: dict, resumed: bool):
        import wandb

        id_file = log_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if resumed and id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "albef"), name=name, id=run_id,
                              dir=str(log_dir), config=config, resume="allow")

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class TeeOutput:
    """Copy this process's stdout and stderr (fds 1 and 2) into `path` (appended) until `close()`."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("ab", buffering=0)
        self._lock = threading.Lock()
        self._saved: list[tuple[int, int]] = []       # (fd, its original target)
        self._threads: list[threading.Thread] = []
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
            fd = stream.fileno()
            original = os.dup(fd)
            read_end, write_end = os.pipe()
            os.dup2(write_end, fd)
            os.close(write_end)
            self._saved.append((fd, original))
            thread = threading.Thread(target=self._pump, args=(read_end, original), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _pump(self, read_end: int, original: int) -> None:
        """Pipe -> the original target and the file. Keeps draining when the terminal goes away (a closed
        `| head`), or the process would block on a full pipe."""
        terminal_ok = True
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                view = memoryview(chunk)
                while terminal_ok and view:
                    try:
                        view = view[os.write(original, view):]
                    except OSError:
                        terminal_ok = False
                with self._lock:
                    self._file.write(chunk)

    def note_exception(self, err: BaseException) -> None:
        """The traceback of the error ending the run, into the file only (the terminal gets it as usual)."""
        text = "".join(traceback.format_exception(err))
        with self._lock:
            self._file.write(text.encode(errors="replace"))

    def close(self) -> None:
        """Restore fds 1 and 2 and drain the pipes (processes that inherited them, e.g. loader workers,
        may keep a pipe open: waiting is bounded)."""
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, original in self._saved:
            os.dup2(original, fd)   # closes this process's last write end of the pipe
        for thread in self._threads:
            thread.join(timeout=5)
        for _, original in self._saved:
            os.close(original)
        self._saved = []
        self._file.close()


def tee_wanted(env=os.environ) -> bool:
    """Outside Slurm only: a Slurm job's output file already holds everything."""
    return "SLURM_JOB_ID" not in env


def rank_devices(entries: list[tuple[str, str]], backend: str) -> str:
    """[(host, device)] of ranks 0..N-1 -> `cuda:0..7 nccl`, `cpu x2 gloo`, `n1 cuda:0..3, n2 cuda:0..3 nccl`."""
    hosts: dict[str, list[str]] = {}
    for host, device in entries:
        hosts.setdefault(host, []).append(device)
    parts = []
    for host, devices in hosts.items():
        indices = [int(d.split(":")[1]) for d in devices if d.startswith("cuda:")]
        if len(indices) == len(devices) and indices == list(range(indices[0], indices[0] + len(indices))):
            text = f"cuda:{indices[0]}" + (f"..{indices[-1]}" if len(indices) > 1 else "")
        elif len(set(devices)) == 1:
            text = devices[0] + (f" x{len(devices)}" if len(devices) > 1 else "")
        else:
            text = ",".join(devices)
        parts.append(f"{host} {text}" if len(hosts) > 1 else text)
    return ", ".join(parts) + f" {backend}"
