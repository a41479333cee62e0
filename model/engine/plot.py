"""`python -m model.engine.plot RUN_DIR`: loss and throughput curves of a run as PNG.

Reads `RUN_DIR/logs/metrics.csv` (written by `model/train.py`) and writes
`RUN_DIR/plots/loss.png` (the total and every `loss_*` term the task logs) and
`RUN_DIR/plots/throughput.png` (samples/s and data-wait fraction); with
`logs/eval.csv` also `RUN_DIR/plots/retrieval.png` (zero-shot retrieval during
pretraining) or `RUN_DIR/plots/eval.png` (a task's accuracies per split).
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from model.engine.progress import EVAL_CSV_NAME  # noqa: E402

LOSS_NAMES = {"loss": "total", "loss_itc": "ITC", "loss_itm": "ITM", "loss_mlm": "MLM"}
RETRIEVAL_CURVES = (("txt_r1", "TR@1"), ("txt_r5", "TR@5"), ("img_r1", "IR@1"), ("img_r5", "IR@5"))


def read_metrics(run_dir: Path, name: str = "metrics.csv") -> dict[str, list[float]]:
    """Columns of `logs/<name>` as float lists (the last row wins for a repeated step)."""
    path = run_dir / "logs" / name
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}: is {run_dir} a training run folder?")
    by_step: dict[int, dict[str, str]] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            by_step[int(row["step"])] = row
    if not by_step:
        raise ValueError(f"{path} holds no rows yet")
    rows = [by_step[s] for s in sorted(by_step)]
    return {key: [float(r[key]) for r in rows if r.get(key) not in (None, "")] for key in rows[0]}


def plot_run(run_dir: str | Path) -> list[Path]:
    run_dir = Path(run_dir)
    cols = read_metrics(run_dir)
    out_dir = run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = cols["step"]

    losses = [(key, LOSS_NAMES.get(key, key.removeprefix("loss_"))) for key in cols
              if key == "loss" or key.startswith("loss_")]
    loss_png = _curves(cols, losses, "loss", f"{run_dir.name}: training losses", out_dir / "loss.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(steps, cols["samples_per_s"], color="tab:blue", label="samples/s")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("samples/s (all ranks)")
    wait = ax.twinx()
    wait.plot(steps, [100 * v for v in cols["data_wait_frac"]], color="tab:orange", label="data wait %")
    wait.set_ylabel("data wait (% of step time)")
    wait.set_ylim(0, 100)
    ax.set_title(f"{run_dir.name}: throughput")
    handles = ax.get_legend_handles_labels()[0] + wait.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="lower right")
    ax.grid(alpha=0.3)
    thr_png = out_dir / "throughput.png"
    fig.tight_layout()
    fig.savefig(thr_png, dpi=120)
    plt.close(fig)
    written = [loss_png, thr_png]
    if (run_dir / "logs" / EVAL_CSV_NAME).is_file():
        written.append(plot_evaluations(run_dir, out_dir))
    return written


def plot_evaluations(run_dir: Path, out_dir: Path) -> Path:
    """The evaluations during training against steps: zero-shot ITC retrieval R@K
    (`train.eval_annotation`), or else every split's overall accuracy (`<split>/acc`)."""
    cols = read_metrics(run_dir, EVAL_CSV_NAME)
    if any(key in cols for key, _ in RETRIEVAL_CURVES):
        return _curves(cols, RETRIEVAL_CURVES, "recall (%)",
                       f"{run_dir.name}: zero-shot retrieval on the held-out set (ITC only)",
                       out_dir / "retrieval.png", marker="o")
    accuracies = [(key, key) for key in cols if key.endswith("/acc")]
    return _curves(cols, accuracies, "accuracy (%)", f"{run_dir.name}: evaluations", out_dir / "eval.png",
                   marker="o")


def _curves(cols: dict[str, list[float]], curves, ylabel: str, title: str, path: Path, marker=None) -> Path:
    """One figure of `(column, label)` curves against the step column."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label in curves:
        if key in cols:
            ax.plot(cols["step"], cols[key], marker=marker, label=label)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="training run folder (holds logs/metrics.csv)")
    args = parser.parse_args(argv)
    try:
        written = plot_run(args.run_dir)
    except (FileNotFoundError, ValueError) as err:
        print(f"model.engine.plot: {err}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
