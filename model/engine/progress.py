"""What a training run reports: the rank-0 progress line, CSV and TensorBoard
metrics, and a per-rank JSON-lines record of every optimiser step.

- `Throughput` times each step, splitting the time spent waiting for the next
  batch from the rest, over a logging window.
- `MetricsLog` (rank 0): appends one row per logging window to
  `logs/metrics.csv` and the same scalars to TensorBoard (`logs/tb/`) and, when
  `train.report_to` names it, Weights & Biases (`logs/wandb/`). On resume
  the rows after the resumed step are dropped so the CSV stays one curve.
  Zero-shot retrieval metrics, when the run evaluates, go to `logs/eval.csv`.
- `StepRecords` (every rank, with `train.debug_records`): `logs/records_rank{R}.jsonl`,
  one JSON object per optimiser step (losses, lr, alpha, queue checksum, data
  position); each start of the trainer first writes a `{"event": "start", ...}`
  line. Tests read these.
"""
from __future__ import annotations

import csv
import datetime
import json
import resource
import time
from pathlib import Path
from typing import Any

import psutil
import torch

CSV_NAME = "metrics.csv"
EVAL_CSV_NAME = "eval.csv"


class Throughput:
    """Step and data-wait timing over a window of optimiser steps."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.window_start = time.perf_counter()
        self.data_wait = 0.0
        self.samples = 0
        self.steps = 0

    def add_wait(self, seconds: float) -> None:
        self.data_wait += seconds

    def add_step(self, samples: int) -> None:
        self.samples += samples
        self.steps += 1

    def summary(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.window_start, 1e-9)
        return {
            "samples_per_s": self.samples / elapsed,
            "steps_per_s": self.steps / elapsed,
            "data_wait_frac": min(1.0, self.data_wait / elapsed),
        }


PROC_STATUS = Path("/proc/self/status")
PROC_CLEAR_REFS = Path("/proc/self/clear_refs")
RESET_PEAK_RSS = "5"  # Linux: writing 5 to clear_refs resets the peak resident set size (VmHWM)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak measurement (the trainer does so when its training loop begins, so
    start-up transients such as DeepSpeed flattening the parameters are not counted)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        PROC_CLEAR_REFS.write_text(RESET_PEAK_RSS)
    except OSError:
        pass  # not Linux, or not permitted: the peak then covers the whole process life


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this rank since the last reset: allocated GPU memory, or peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def memory_mb(device: torch.device) -> float:
    """Memory this rank holds now: allocated GPU memory, or the process's resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    return psutil.Process().memory_info().rss / 2**20


def format_eta(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    return str(datetime.timedelta(seconds=int(seconds)))


def progress_line(step: int, total: int, epoch: int, scalars: dict[str, float]) -> str:
    """`step 120/3000 ep 0 | 812.4 samples/s | data 3.1% | ETA 1:02:03 | loss 4.321 ...`."""
    eta = (total - step) / scalars["steps_per_s"] if scalars["steps_per_s"] > 0 else float("inf")
    loss_keys = ["loss"] + sorted(k for k in scalars if k.startswith("loss_"))
    losses = " ".join(f"{k.replace('loss_', '')} {scalars[k]:.4f}" for k in loss_keys if k in scalars)
    accs = " ".join(f"{k} {scalars[k]:.3f}" for k in sorted(scalars) if k.startswith("acc"))
    return (f"step {step}/{total} ep {epoch} | {scalars['samples_per_s']:.1f} samples/s | "
            f"data {100 * scalars['data_wait_frac']:.1f}% | ETA {format_eta(eta)} | {losses} | "
            + (f"{accs} | " if accs else "")
            + (f"cos img/txt {scalars['cos_image']:.2f}/{scalars['cos_text']:.2f} | "
               if "cos_image" in scalars and "cos_text" in scalars else "")
            + (f"bad {scalars['bad_samples']:.0f} | " if scalars.get("bad_samples") else "")
            + f"lr {scalars['lr']:.3g} alpha {scalars['alpha']:.3f} | mem {scalars['peak_mem_mb']:.0f} MB")


class MetricsLog:
    """Rank-0 scalars, one row per logging window, to every backend of `train.report_to`: `csv`
    (logs/metrics.csv, logs/eval.csv), `tensorboard` (logs/tb/), `wandb` (logs/wandb/, `model.engine.tracking`)."""

    def __init__(self, log_dir: Path, resume_step: int | None, report_to=("csv", "tensorboard"),
                 run_name: str = "albef", config: dict | None = None):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.report_to = tuple(report_to)
        self.csv_path = log_dir / CSV_NAME
        for path in (self.csv_path, log_dir / EVAL_CSV_NAME):
            _truncate_after(path, resume_step)
        self.tb = None
        if "tensorboard" in self.report_to:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(log_dir / "tb"), purge_step=None if resume_step is None else resume_step + 1)
        self.wandb = None
        if "wandb" in self.report_to:
            from model.engine.tracking import WandbRun
            self.wandb = WandbRun(log_dir, run_name, config or {}, resumed=resume_step is not None)
        self.fieldnames: list[str] | None = None
        if self.csv_path.is_file() and self.csv_path.stat().st_size:
            with self.csv_path.open() as f:
                self.fieldnames = next(csv.reader(f), None)

    def write(self, step: int, scalars: dict[str, float], tb_only: dict[str, float] | None = None) -> None:
        """One CSV row (columns fixed by the first row); the same scalars (+ `tb_only` ones, which are no
        CSV columns) to TensorBoard and W&B as `train/<name>`."""
        if "csv" in self.report_to:
            row = {"step": step, **scalars}
            if self.fieldnames is None:
                self.fieldnames = list(row)
                with self.csv_path.open("w", newline="") as f:
                    csv.DictWriter(f, fieldnames=self.fieldnames).writeheader()
            with self.csv_path.open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.fieldnames, extrasaction="ignore").writerow(row)
        self._scalars("train", {k: v for k, v in {**scalars, **(tb_only or {})}.items() if k != "epoch"}, step)

    def write_eval(self, step: int, metrics: dict[str, float]) -> None:
        """Evaluation metrics (`split/metric`): `logs/eval.csv`, TensorBoard and W&B `eval/*`."""
        if "csv" in self.report_to:
            path = self.csv_path.with_name(EVAL_CSV_NAME)
            new = not path.is_file()
            with path.open("a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=["step", *metrics], extrasaction="ignore")
                if new:
                    writer.writeheader()
                writer.writerow({"step": step, **metrics})
        self._scalars("eval", metrics, step)

    def _scalars(self, section: str, scalars: dict[str, float], step: int) -> None:
        named = {f"{section}/{key}": value for key, value in scalars.items()}
        if self.tb is not None:
            for key, value in named.items():
                self.tb.add_scalar(key, value, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(named, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.close()


def _truncate_after(path: Path, resume_step: int | None) -> None:
    """Drop a CSV's rows after `resume_step` (all of it for a fresh start)."""
    if not path.is_file():
        return
    if resume_step is None:
        path.unlink()
        return
    with path.open() as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    fields = list(rows[0].keys())
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(r for r in rows if int(r["step"]) <= resume_step)


class StepRecords:
    """Per-rank JSON lines: one start event per launch, then one record per step."""

    def __init__(self, log_dir: Path, rank: int):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.path = log_dir / f"records_rank{rank}.jsonl"
        self._file = self.path.open("a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, default=_jsonable) + "\n")

    def close(self) -> None:
        self._file.close()


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """All JSON lines of a records file (for tests and tools)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
