"""Typed `train:`, `data:` and `eval:` sections shared by every task.

Each recipe names its section classes (subclasses of these add task keys). The
defaults are the paper's pretraining values; a task's YAML gives what differs.
An unknown key, a wrong type or an impossible value stops the run before any
process group starts, with one line naming the setting (`model.settings.build_settings`).
"""
from __future__ import annotations

import importlib.util
import signal
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

REPORT_BACKENDS = ("csv", "tensorboard", "wandb")   # train.report_to


def _positive_ints(where: str, obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and value < 1:
            raise ValueError(f"{where}.{name}={value!r} must be a positive integer")


def _non_negative(where: str, obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value < 0:
            raise ValueError(f"{where}.{name}={value!r} must not be negative")


@dataclass
class TrainSettings:
    """The optimisation recipe and the run mechanics of `model/engine/trainer.py`."""
    lr: float = 1e-4                     # AdamW peak learning rate
    warmup_lr: float = 1e-5              # linear warm-up from this ...
    warmup_steps: int = 2000             # ... over these optimiser steps
    min_lr: float = 1e-5                 # cosine floor
    weight_decay: float = 0.02           # 0 for 1-D parameters
    epochs: int = 30
    alpha: float = 0.4                   # distillation weight, ramped from 0 over the first epoch ...
    alpha_warmup: bool = True            # ... when true (the reference's `warm_up`); false: alpha from step 0
    batch_size_per_rank: int = 64
    max_tokens: int = 25                 # caption truncation ([CLS] included)
    gradient_accumulation_steps: int = 1
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    seed: int = 42
    output_dir: str = "runs/albef"
    log_every: int = 50                  # optimiser steps per progress line / metrics row
    checkpoint_every: int = 2000
    keep_checkpoints: int = 3
    stop_signals: list[str] = field(default_factory=lambda: ["SIGUSR1"])
    stop_check_every: int = 10           # optimiser steps between checks of the stop file (signals: every step)
    dist_timeout_s: float = 1800.0
    # weight of each loss term in the summed loss (loss name without `loss_`); 1.0 = the paper's unweighted sum
    loss_weights: dict[str, float] = field(default_factory=dict)
    debug_records: bool = False          # per-step checksums/fingerprints in logs/records_rank{R}.jsonl (tests)
    stop_on_collapse: bool = False       # a collapse found by the health check ends the run (exit 3), checkpointed
    # ... once it has persisted this many optimiser steps: small runs that go on to learn can look collapsed
    # for a few hundred steps after warm-up (docs/COLLAPSE.md); every finding is still warned about at once
    collapse_patience_steps: int = 500
    init_checkpoint: Optional[str] = None  # weights to start from (fine-tuning); --checkpoint overrides
    # where the scalars go (the same ones everywhere): logs/metrics.csv + eval.csv, logs/tb/, W&B (logs/wandb/)
    report_to: list[str] = field(default_factory=lambda: ["csv", "tensorboard"])

    def check(self, where: str) -> None:
        _positive_ints(where, self, "epochs", "batch_size_per_rank", "max_tokens", "gradient_accumulation_steps",
                       "log_every", "checkpoint_every", "keep_checkpoints", "stop_check_every")
        _non_negative(where, self, "lr", "warmup_lr", "min_lr", "weight_decay", "warmup_steps", "eps",
                      "collapse_patience_steps")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"{where}.alpha={self.alpha} must lie in [0, 1]")
        for beta in self.betas:
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"{where}.betas={list(self.betas)} must lie in [0, 1)")
        for name in self.stop_signals:
            if not isinstance(getattr(signal, name, None), signal.Signals):
                raise ValueError(f"{where}.stop_signals: {name!r} is not a signal name (e.g. SIGUSR1)")
        if self.dist_timeout_s <= 0:
            raise ValueError(f"{where}.dist_timeout_s={self.dist_timeout_s} must be positive")
        for backend in self.report_to:
            if backend not in REPORT_BACKENDS:
                raise ValueError(f"{where}.report_to: {backend!r} is not a backend; "
                                 f"known: {', '.join(REPORT_BACKENDS)}")
        if "wandb" in self.report_to and importlib.util.find_spec("wandb") is None:
            raise ValueError(f"{where}.report_to: wandb is not installed (pip install -e '.[tracking]')")


@dataclass
class DataSettings:
    """Data settings every task has."""
    num_workers: int = 6                 # DataLoader worker processes per rank
    augment: dict[str, Any] = field(default_factory=dict)   # pipeline.transforms.AugmentConfig keys
    device_augment: ClassVar[bool] = False   # whether this task's loader supports augment.on_device

    def check(self, where: str) -> None:
        if self.num_workers < 0:
            raise ValueError(f"{where}.num_workers={self.num_workers} must not be negative")
        from pipeline.transforms import AugmentConfig
        try:
            augment = AugmentConfig.from_dict(self.augment)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}.augment: {err}") from None
        if augment.on_device and not self.device_augment:
            raise ValueError(f"{where}.augment.on_device: only the pretraining shard loader hands crops to the "
                             f"device; this task's datasets augment on the loader (set it to false)")


@dataclass
class ImageData(DataSettings):
    """Data settings of a task whose annotations name image files: a folder or tar shards hold them."""
    image_root: Optional[str] = None     # folder the annotation's image paths are relative to
    image_shards: Union[list[str], str, None] = None   # ... or tar shards holding them by the same names

    def images(self):
        """The image store (pipeline/image_store.py: a brace pattern, glob, folder of .tar or a list of
        them for the shards); exactly one of the two keys must be set."""
        from pipeline.image_store import image_store
        return image_store(self.image_root, self.image_shards)


@dataclass
class EvalSettings:
    """Base of a task's `eval:` section."""

    def check(self, where: str) -> None:
        pass
