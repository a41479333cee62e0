"""What a task tells the engine: the one interface between `model/engine/` and `model/tasks/`.

A recipe says only what differs between tasks: its config sections, how to
build the model (and load weights into it), the training batches, the loss dict
of one step, and the evaluation with its metrics. The engine
(`model/engine/trainer.py`) owns everything else: DeepSpeed start-up, parameter
groups, LR schedule, alpha ramp, gradient accumulation, checkpoint/resume (loader
position, queues, RNG, the recipe's own `state_dict`), stop requests, progress,
CSV/TensorBoard, plots and export.

The config's `task:` key selects the recipe (`model/tasks/__init__.py`).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, Protocol

import torch
from torch import nn

from model.engine.config import RunConfig
from model.engine.settings import DataSettings, EvalSettings, TrainSettings
from model.settings import ALBEFSettings


class TrainLoader(Protocol):
    """A resumable per-rank batch source: `pipeline.loader.ShardLoader` or `pipeline.map_loader.MapLoader`.

    Every rank yields exactly `batches_per_epoch` batches per epoch (lockstep),
    iteration resumes where `load_state_dict` left it and stops at the epoch's end;
    the next `iter()` starts the next epoch.
    """
    batches_per_epoch: int

    @property
    def epoch(self) -> int: ...

    def __iter__(self) -> Iterator[dict]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def stats(self) -> dict: ...

    def bad_samples(self) -> dict[str, int]: ...     # distinct bad samples of this rank, by reason


@dataclass(frozen=True)
class RunEnv:
    """Where the run executes (filled by the engine before the recipe is built)."""
    rank: int
    world: int
    device: torch.device
    global_batch: int          # samples per optimiser step over all ranks (0: evaluation only)
    enqueue_batch: int         # samples per forward over all ranks (the queues' write size; 0: evaluation only)


class Recipe:
    """Base class of every task recipe; subclasses set the class attributes and override the methods."""

    name: ClassVar[str]                                   # the config's `task:` value
    model_settings: ClassVar[type] = ALBEFSettings        # checks the `model:` section at start-up
    train_settings: ClassVar[type[TrainSettings]] = TrainSettings
    data_settings: ClassVar[type[DataSettings]] = DataSettings
    eval_settings: ClassVar[type[EvalSettings] | None] = None
    task_settings: ClassVar[dict[str, type]] = {}        # further top-level sections: name -> dataclass
    loss_names: ClassVar[tuple[str, ...]] = ()           # keys of the loss dict; `train.loss_weights` weighs them
    # the evaluation metric whose best value picks the exported model ("val/r_mean"); None: export at the end
    select_metric: ClassVar[str | None] = None
    evaluate_every_epoch: ClassVar[bool] = False          # evaluate at every epoch end (fine-tuning recipes)
    uses_queue: ClassVar[bool] = False                    # model.queue_size is checked against the global batch

    def __init__(self, run: RunConfig, env: RunEnv | None):
        self.run = run
        self.env = env
        self.out_dir: Path | None = None     # the run folder (set by the engine)

    # ------------------------------------------------------------- model

    def build_model(self, tokenizer, checkpoint: str | None) -> nn.Module:
        """The model with its initial weights (`checkpoint`: the weights to start from, or None).

        The module must offer `trainable_parameters()` (what the optimiser updates;
        momentum copies excluded). Called on every rank with the same seed.
        """
        raise NotImplementedError

    def refuse_init_weights(self) -> None:
        """For tasks whose every weight comes from --checkpoint: `model.vision.init` and
        `model.text.init` (ImageNet / BERT starting points) would be silently overwritten."""
        for part in ("vision", "text"):
            init = self.run.model[part]["init"]
            if init:
                raise ValueError(f"model.{part}.init={init!r}: task {self.name} takes every weight from "
                                 f"--checkpoint; set it to null")

    def load_report(self) -> str | None:
        """What `build_model` loaded, printed once at start-up."""
        return None

    # ------------------------------------------------------------- training

    def train_loader(self, tokenizer) -> TrainLoader:
        raise NotImplementedError

    def step(self, module: nn.Module, batch: dict, alpha: float, generator: torch.Generator
             ) -> dict[str, torch.Tensor]:
        """One forward on a batch (tensors still on the host): `loss_*` terms (with grad) and metrics.

        Return device tensors; the engine weighs and sums the `loss_names` terms and
        reduces the metrics only at logging steps (never call `.item()` here).
        """
        raise NotImplementedError

    def itc_chance(self) -> float | None:
        """Accuracy of a guessing ITC (1 / columns of a similarity row), for the health check; None: no ITC."""
        return None

    def after_step(self, module: nn.Module) -> None:
        """Called after every optimiser step on every rank (e.g. the temperature clamp)."""

    def extra_state(self, module: nn.Module) -> dict[str, Any]:
        """Task state saved in checkpoints besides DeepSpeed's (e.g. the feature queues)."""
        return {}

    def load_extra_state(self, module: nn.Module, state: dict[str, Any]) -> None:
        pass

    def export_state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """What `export/albef.pth` holds under `model` (full tensors; ZeRO-3 gathers before calling)."""
        return module.state_dict()

    # ------------------------------------------------------------- evaluation

    def should_evaluate(self, step: int, epoch_ended: bool, last: bool) -> bool:
        """Asked after every optimiser step (and at epoch ends); the same answer on every rank."""
        return self.evaluate_every_epoch and (epoch_ended or last)

    def evaluate(self, module: nn.Module, tokenizer, step: int, epoch: int) -> dict[str, dict[str, float]]:
        """Collective evaluation during training: {split: {metric: value}} (or flat {"val/acc": v}).

        May write result files under `self.out_dir`; rank 0 prints its table.
        The engine logs the numbers and, with `select_metric`, exports the best model.
        """
        raise NotImplementedError

    def save_best(self, export_dir: Path) -> None:
        """Rank 0, after the engine exported a new best model: write the evaluation's files beside it."""

    def evaluate_split(self, module: nn.Module, tokenizer, split: str, options: argparse.Namespace) -> dict:
        """`python -m model.evaluate`: collective evaluation of one split -> the JSON record (rank 0's
        is written). `record["metrics"]` holds the numbers; `record["table"]` the printed summary."""
        raise NotImplementedError

    def splits(self) -> tuple[str, ...]:
        """The evaluation splits this task knows (first one is the default of `model.evaluate`)."""
        return ("test",)
